"""Temporary outputs of a job: created next to their destination, recorded before they exist, and removable
by whoever settles an attempt whose worker could not clean up itself.

A worker writes each output under a temporary name (TEMP_PREFIX + random + final name) and renames it when it
is complete. It removes its temporary files itself when it fails or is stopped; but a worker killed outright
(SIGKILL, the OOM killer) cannot. So each temporary path is first appended to a record file, RECORD_NAME in
the attempt's run directory, before the file is created; when the attempt is over, the runner
calls remove_recorded() on that record. The directories are the submitter's: each is opened once, checked to be at
its resolved path, and root makes, opens, renames and removes files there only through that descriptor, whatever
is renamed or swapped for a symlink on its path meanwhile. A directory made for a job's outputs (a convert given no
output path) is noted too, once made, and removed by remove_recorded if it is still that one and empty.

While the outputs get their names, each rename is first noted in COMMIT_NAME, next to the record, with the file
the destination held before (kept aside under a temporary name until the result is written). A worker killed
before its result says "completed" leaves that note; undo_commit() then puts the earlier files back, so that a
failed attempt never leaves its outputs in place, nor costs the files they replaced.

Likewise a disk image a repair made root's while it was attached (offline_fix.devices) is noted in HELD_NAME,
with its owner and mode, before it changes hands; release_held() gives back what a killed worker could not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import re
import stat
import struct
from typing import Callable, TypeVar

from h2kd.operations.qemuimg import OperationError

TEMP_PREFIX = ".h2k-tmp-"
RECORD_NAME = "temp-files"
COMMIT_NAME = "commit"
HELD_NAME = "held-images"
NAME_MAX = 255      # the longest file name, in bytes, that Linux file systems take
_Made = TypeVar("_Made")


class TempFiles:
    """Temporary outputs of this job; removed unless committed.

    record: a file to which each temporary path is appended, one absolute path a line, BEFORE the file is
    created, so that a worker killed outright (SIGKILL, OOM) leaves a list of what to
    remove. A name that turned out to be taken (O_EXCL failed, nothing was created) is withdrawn with a
    line "-<path>". A directory made for the outputs is noted once made and opened, "+<device>:<inode>:<path>",
    and withdrawn with "-" before that line once the worker removed it itself (note_made_directory,
    withdraw_made_directory). See remove_recorded().
    """

    def __init__(self, record: str | None = None, owner: dict[str, int] | None = None, durable: bool = True) -> None:
        """owner {"uid", "gid"}: whom the temporary files belong to from their creation (the submitter, whose
        rights qemu-img writes them with). durable: each note reaches the disk before what it notes is done, so
        that a machine that crashes (not only a killed worker) leaves nothing unnoted behind; a job run with
        parameters.sync false accepts that a crash may leave its files, and pays for no sync."""
        self.paths: list[str] = []
        self.record = record
        self.owner = owner
        self.durable = durable
        self._made: dict[str, tuple[int, int]] = {}   # path -> (device, inode) of the file created there
        # Each directory is opened once (when a file is first made in it, or by the caller: adopt_directory):
        # whatever the submitter renames or swaps on its path later, root opens, removes and renames the temporary
        # files there, and only there.
        self._directories: dict[str, int] = {}
        self._directory_notes: dict[str, str] = {}     # path -> its "+..." line (note_made_directory)

    def adopt_directory(self, directory: str, fd: int) -> None:
        """Make files in `directory` through fd (see open_output_directory), opened and checked before; closed with
        the others by remove_all."""
        assert directory not in self._directories
        self._directories[directory] = fd

    def _directory(self, directory: str) -> int:
        fd = self._directories.get(directory)
        if fd is None:
            fd = self._directories[directory] = open_output_directory(directory)
        return fd

    def _note(self, line: str) -> None:
        if self.record:
            _append_line(self.record, line, self.durable)

    def note_made_directory(self, path: str, fd: int) -> None:
        """`path` (resolved), opened on fd, a directory made for this attempt's outputs (or taken over, empty,
        from an attempt killed outright): a worker killed outright leaves it to remove_recorded, which removes
        it while it is still that directory and empty."""
        _refuse_line_break(path)
        st = os.fstat(fd)
        self._directory_notes[path] = f"+{st.st_dev}:{st.st_ino}:{path}"
        self._note(self._directory_notes[path])

    def withdraw_made_directory(self, path: str) -> None:
        """The worker removed the directory at `path` itself: another made at that name since, perhaps with the
        inode number just freed, is not for remove_recorded to remove."""
        line = self._directory_notes.pop(path, None)
        if line:
            self._note("-" + line)

    def note_commit(self, temp: str, destination: str, aside: str | None) -> None:
        """Before the temporary file `temp` gets the name `destination`, replacing the file kept aside as `aside`
        (None: it replaces nothing): note how to undo that (see undo_commit)."""
        if self.record:
            device, inode = self._made[temp]
            _append_line(self._commit_record(),
                         json.dumps({"destination": destination, "device": device, "inode": inode, "aside": aside,
                                     "generation": _generation_of(temp)}),
                         self.durable)

    def withdraw_commit(self) -> None:
        """The worker undid its commit itself: nothing is left for undo_commit to do, and a file made at one of
        those names since (even with the freed inode number) is not the worker's."""
        if self.record:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._commit_record())

    def _commit_record(self) -> str:
        assert self.record
        return os.path.join(os.path.dirname(self.record), COMMIT_NAME)

    def _claim_name(self, destination: str, make: Callable[[str], _Made | None],
                    failure: str) -> tuple[str, _Made] | None:
        """Find a free temporary name next to `destination` for make(name) (a name in the destination's
        directory) to put a file under. Each path is noted in the record before make runs, and withdrawn if
        make made nothing there: the name was taken (FileExistsError: the next name is tried) or there was
        nothing to put there (make returned None: so does this). The path and what make returned;
        OperationError(failure) once 100 names in a row were taken."""
        _refuse_line_break(destination)
        directory, name = os.path.split(destination)
        for _ in range(100):
            temp_name = _within_name_max(f"{TEMP_PREFIX}{os.urandom(6).hex()}-{name}")
            path = os.path.join(directory, temp_name)
            self._note(path)
            try:
                made = make(temp_name)
            except FileExistsError:
                self._note("-" + path)
                continue
            if made is None:
                self._note("-" + path)
                return None
            return path, made
        raise OperationError("INTERNAL", failure)

    def create(self, destination: str) -> str:
        """A new temporary file next to `destination`, whose directory must be given as a resolved path (see
        open_output_directory)."""
        directory = os.path.dirname(destination)
        # Moved since it was opened, the directory is no longer where the record says its files are: a worker
        # killed outright would leave them there.
        dir_fd = self.directory_still_at(directory, "convert")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        claimed = self._claim_name(destination, lambda temp_name: os.open(temp_name, flags, 0o600, dir_fd=dir_fd),
                                   f"could not create a temporary file in {directory}")
        assert claimed is not None          # os.open gives a descriptor or raises
        path, fd = claimed
        try:
            if self.owner:
                os.fchown(fd, self.owner["uid"], self.owner["gid"])
            made = os.fstat(fd)
        finally:
            os.close(fd)
        self._made[path] = (made.st_dev, made.st_ino)
        self.paths.append(path)
        return path

    def keep_aside(self, destination: str, dir_fd: int) -> str | None:
        """Give the file now at `destination` (its name looked up in dir_fd) a second, temporary name, recorded
        like the others, so that it can be put back if a commit that replaces it fails half-way; None when
        nothing is there. The temporary name goes with remove_all() once the commit is whole."""
        name = os.path.basename(destination)

        def link(temp_name: str) -> bool | None:
            try:
                os.link(name, temp_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            return True
        claimed = self._claim_name(destination, link, f"could not keep {destination} aside")
        if claimed is None:
            return None
        self.paths.append(claimed[0])
        return claimed[0]

    def open_made(self, path: str, flags: int) -> int:
        """A descriptor of the temporary file made at `path` (its name, in the directory opened when it was
        made), refusing anything else found there now: the submitter may own the directory and swap the name
        for a symlink or a hard link to another file, which root would then write, chmod or chown."""
        replaced = OperationError("PERMISSION_DENIED", f"the temporary file {path} was replaced during the job",
                                  "commit")
        try:
            fd = os.open(os.path.basename(path), flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self._directory(os.path.dirname(path)))
        except OSError as e:
            if e.errno == errno.ELOOP:      # a symlink
                raise replaced from None
            raise
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self._made.get(path) or st.st_nlink != 1:
            os.close(fd)
            raise replaced
        return fd

    def directory_still_at(self, directory: str, phase: str = "commit") -> int:
        """The descriptor of `directory`, where temporary files were made, once it is checked to be still there
        (see open_output_directory): the outputs get their names only where they were asked for."""
        fd = self._directory(directory)
        if not _is_at(fd, directory):
            raise _moved(directory, phase)
        return fd

    def forget(self, path: str) -> None:
        self.paths.remove(path)

    def remove(self, path: str) -> None:
        """Remove one temporary file now (an intermediate no longer needed)."""
        self._unlink(path)
        self.paths.remove(path)

    def remove_all(self) -> None:
        """Remove every temporary file not committed, and close the directories they were made in."""
        for path in self.paths:
            self._unlink(path)
        self.paths.clear()
        for fd in self._directories.values():
            os.close(fd)
        self._directories.clear()

    def _unlink(self, path: str) -> None:
        try:
            os.unlink(os.path.basename(path), dir_fd=self._directory(os.path.dirname(path)))
        except FileNotFoundError:
            pass


def _within_name_max(name: str) -> str:
    """`name`, cut at its end to NAME_MAX bytes (as the file system counts them, not characters: a Cyrillic
    letter takes two) between two characters. A temporary name needs only its prefix, found by remove_recorded,
    and its random part; and it is noted in the record as text, which a character cut in two would not be."""
    name = name[:NAME_MAX]
    while len(os.fsencode(name)) > NAME_MAX:
        name = name[:-1]
    return name


def open_output_directory(directory: str) -> int:
    """The directory at `directory` (a resolved path: no symlink in it), opened, and checked to be the one at that
    path: an output directory is the submitter's, who may swap it, or any directory above it they own, for a
    symlink to somewhere root alone may write. Its names are then used through the descriptor."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not _is_at(fd, directory):
        os.close(fd)
        raise _moved(directory, "convert")
    return fd


def _is_at(fd: int, directory: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == directory
    except OSError:
        return True     # no /proc to tell: O_NOFOLLOW covered the last component at least


def _moved(directory: str, phase: str) -> OperationError:
    return OperationError("PERMISSION_DENIED", f"the output directory {directory} was moved or replaced during the "
                          "job; nothing was written", phase)


def _refuse_line_break(path: str) -> None:
    """A record is a line a path: a name with a line break (a directory a symlink of the submitter's leads to)
    would add lines of their choosing."""
    if "\n" in path:
        raise OperationError("VALIDATION_FAILED", f"{path!r} holds a line break: h2kd makes no file there")


def _append_line(path: str, line: str, sync: bool) -> None:
    # Without sync the line survives the death of the process (the page cache keeps it), not a crash of the
    # machine: the record and the files it names may be on different file systems, committed in any order.
    # A note is a few bytes written before the conversion's data or after its outputs were synced: cheap.
    created = not os.path.lexists(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if sync and created:
        _sync_directory(os.path.dirname(path))


def _sync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _record_lines(record: str) -> list[str]:
    try:
        with open(record, encoding="utf-8", errors="replace", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
            return f.read().splitlines()
    except OSError:
        return []


def _temp_paths(lines: list[str]) -> list[str]:
    """The temporary paths a TempFiles record's lines list (withdrawn ones left out), in order."""
    withdrawn = {line[1:] for line in lines if line.startswith("-")}
    return [line for line in dict.fromkeys(lines) if line.startswith("/") and line not in withdrawn]


_DIRECTORY_NOTE = re.compile(r"\+(\d{1,20}):(\d{1,20}):(/.+)", re.ASCII)


def _made_directories(lines: list[str]) -> list[tuple[int, int, str]]:
    """The directories a TempFiles record's lines say were made for the outputs and not removed by the worker:
    (device, inode, path), in order."""
    withdrawn = {line[1:] for line in lines if line.startswith("-+")}
    made = []
    for line in lines:
        note = _DIRECTORY_NOTE.fullmatch(line)
        if note and line not in withdrawn:
            made.append((int(note.group(1)), int(note.group(2)), note.group(3)))
    return made


def remove_recorded(record: str, roots: list[str], keep: frozenset[str] | set[str] = frozenset(),
                    job_id: str | None = None) -> list[str]:
    """Remove the temporary files a killed worker left, as listed in its TempFiles record; the removed paths.

    Only what is certainly a temporary output is removed: a regular file (never through a symlink, neither
    the file nor any directory above it) whose name carries TEMP_PREFIX, in a directory under one of the
    roots, and not one of the paths in keep (the attempt's final outputs). Then, given the job's id, each
    directory made for its outputs (note_made_directory), last first: only a job directory (named after the
    job, see h2kd.operations.convert.JobDirectory) right in one of the roots, still the one made (its device and
    inode), and empty.
    """
    real_roots = [os.path.realpath(r).rstrip("/") + "/" for r in roots]
    lines = _record_lines(record)
    removed = []
    for path in _temp_paths(lines):
        directory, name = os.path.split(os.path.normpath(path))
        if not name.startswith(TEMP_PREFIX) or path in keep or os.path.normpath(path) in keep:
            continue
        if _remove_under(directory, name, real_roots, lambda st: os.unlink if stat.S_ISREG(st.st_mode) else None):
            removed.append(path)
    job_directory = re.compile(re.escape(job_id) + r"(-[0-9a-f]{8})?") if job_id else None
    for device, inode, path in reversed(_made_directories(lines)):
        parent, name = os.path.split(os.path.normpath(path))
        if not job_directory or not job_directory.fullmatch(name) or parent + "/" not in real_roots:
            continue
        # rmdir fails unless it is empty: what it holds is someone's.
        if _remove_under(parent, name, real_roots, lambda st, made=(device, inode): os.rmdir
                         if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == made else None):
            removed.append(path)
    return removed


def _remove_under(directory: str, name: str, real_roots: list[str],
                  removal: Callable[[os.stat_result], Callable[..., None] | None]) -> bool:
    """Remove `name` from `directory` (opened as _open_directory_under does) with what removal(its lstat) gives
    (os.unlink, os.rmdir; None: it stays); whether it went."""
    dir_fd = _open_directory_under(directory, real_roots)
    if dir_fd is None:
        return False
    try:
        remove = removal(os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
        if remove is None:
            return False
        remove(name, dir_fd=dir_fd)
        return True
    except OSError:
        return False
    finally:
        os.close(dir_fd)


def _open_directory_under(directory: str, real_roots: list[str]) -> int | None:
    """The directory opened, if it lies under one of the (resolved, "/"-ended) roots and is reached without a
    symlink anywhere on its path; else None: what lies there is left alone."""
    if os.path.realpath(directory) != directory or not any((directory + "/").startswith(r) for r in real_roots):
        return None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    if not _is_at(fd, directory):       # a directory above it swapped for a symlink since realpath looked
        os.close(fd)
        return None
    return fd


def undo_commit(record: str, roots: list[str]) -> list[str]:
    """Undo what a worker killed while its outputs got their names had done, as its commit record (COMMIT_NAME)
    notes, last first: a destination that holds the new file gets back the file it replaced (kept aside), or
    loses the new file if it replaced nothing. The destinations undone.

    Only files are renamed or removed, each in its own directory (under an output root, reached without a
    symlink), and a destination only while it holds the very file the worker made, or nothing."""
    lines = _record_lines(record)
    real_roots = [os.path.realpath(r).rstrip("/") + "/" for r in roots]
    undone = []
    for line in reversed(lines):
        try:
            entry = json.loads(line)
            destination, made = os.path.normpath(entry["destination"]), (int(entry["device"]), int(entry["inode"]))
            aside = entry.get("aside")
        except (ValueError, TypeError, KeyError):
            continue
        directory, name = os.path.split(destination)
        if aside is not None and not _kept_beside(aside, directory):
            continue
        dir_fd = _open_directory_under(directory, real_roots)
        if dir_fd is None:
            continue
        try:
            if _undo_one(dir_fd, name, made, entry.get("generation"), os.path.basename(aside) if aside else None):
                os.fsync(dir_fd)
                undone.append(destination)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
    return undone


def _kept_beside(aside: object, directory: str) -> bool:
    """Whether `aside` names a temporary file in `directory` (where a file replaced there was kept)."""
    return (isinstance(aside, str) and os.path.dirname(os.path.normpath(aside)) == directory
            and os.path.basename(aside).startswith(TEMP_PREFIX))


def _undo_one(dir_fd: int, name: str, made: tuple[int, int], generation: object, aside: str | None) -> bool:
    """Undo one rename in the directory open on dir_fd: whether something changed. generation: the made file's
    inode generation, if known: a file made at the name since, with the freed inode number, is not it."""
    current = _status(name, dir_fd)
    holds_new = (current is not None and (current.st_dev, current.st_ino) == made
                 and (generation is None or _generation_of(name, dir_fd) == generation))
    if aside is None:
        if holds_new:
            os.unlink(name, dir_fd=dir_fd)
            return True
        return False
    kept = _status(aside, dir_fd)
    if kept is None or not stat.S_ISREG(kept.st_mode):
        return False        # nothing to put back: the new file, whole, is better than none
    if current is None or holds_new:    # (holding the kept file itself, it was never replaced)
        os.rename(aside, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return True
    return False


def _generation_of(path: str, dir_fd: int | None = None) -> int | None:
    """inode_generation() of the regular file at `path`; None if it cannot be opened or keeps none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return inode_generation(fd)
    finally:
        os.close(fd)


def _status(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


# FS_IOC_GETVERSION (linux/fs.h: _IOR('v', 1, long)): the inode's generation, which ext4, XFS and btrfs change
# whenever they give an inode number to a new file. _IOR puts "read" (2) at bit 29 on powerpc, MIPS, SPARC
# and Alpha, at bit 30 elsewhere (asm-generic/ioctl.h).
_IOC_READ_AT_29 = platform.machine().startswith(("ppc", "powerpc", "mips", "sparc", "alpha"))
_FS_IOC_GETVERSION = (2 << (29 if _IOC_READ_AT_29 else 30)) | (struct.calcsize("l") << 16) | (ord("v") << 8) | 1


def inode_generation(fd: int) -> int | None:
    """The generation of the inode open on `fd`; None where the file system does not keep one (tmpfs)."""
    try:
        answer = fcntl.ioctl(fd, _FS_IOC_GETVERSION, bytes(struct.calcsize("l")))
    except OSError:
        return None
    return struct.unpack("I", answer[:4])[0]     # the kernel writes an int


def note_held(record: str, path: str, before: os.stat_result, generation: int | None) -> None:
    """Before an image (`path`, `before` its status, `generation` its inode's) is made root's: its owner and
    mode, to give back. With the generation, a file made later with the same inode number (ext4 gives a freed
    number to the next file at once) is told apart from the image."""
    entry = {"path": path, "device": before.st_dev, "inode": before.st_ino, "generation": generation,
             "uid": before.st_uid, "gid": before.st_gid, "mode": before.st_mode & 0o777}
    line = (json.dumps(entry) + "\n").encode()
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if os.write(fd, line) != len(line):     # a nearly full disk: the image is not made root's then
            raise OSError(errno.ENOSPC, f"could not note {path} in {record}")
        os.fsync(fd)
    finally:
        os.close(fd)


def hold_image(fd: int) -> None:
    """Mark the image open on `fd` as held by a live repair (an exclusive flock, which the kernel drops when no
    process, nor a loop device bound to the file, has it open any more): release_held leaves it alone until
    then. Raises BlockingIOError if another process holds such a lock; a file system without flock is not marked."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise BlockingIOError(e.errno, "the image is locked by another process") from None
        if e.errno not in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
            raise


def bound_to_loop(path: str) -> bool:
    """Whether some loop device is bound to the file at `path` (as /sys/block/loop*/loop/backing_file says)."""
    for entry in os.scandir("/sys/block"):
        try:
            with open(os.path.join(entry.path, "loop", "backing_file"), encoding="utf-8", errors="replace") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.removesuffix(" (deleted)") == path:
            return True
    return False


_HELD_KEYS = {"path": str, "device": int, "inode": int, "uid": int, "gid": int, "mode": int}


def _held_entries(record: str) -> list[dict[str, object]] | None:
    """The well-formed entries of a record (a line cut short by a full disk, or damaged, is left out); None if
    it cannot be read."""
    try:
        with open(record, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if (isinstance(entry, dict) and all(isinstance(entry.get(k), t) for k, t in _HELD_KEYS.items())
                and isinstance(entry.get("generation"), (int, type(None)))):   # absent: noted by an earlier h2kd
            entries.append(entry)
    return entries


def release_held(record: str, attached: Callable[[str], bool] = bound_to_loop) -> list[str]:
    """Give back the images a killed worker left root's (note_held); the paths given back. An image is given
    back only if it is still that file (device, inode and its generation) at that very path (no symbolic link on
    the way), still root's and 0600,
    and no longer held: neither locked by a live repair (hold_image) nor, as attached(path) says, bound to a
    loop device. The record is removed once nothing in it is left to give back."""
    entries = _held_entries(record)
    if entries is None:
        return []
    given_back, waiting = [], []
    for entry in entries:
        path = str(entry["path"])
        if attached(path):
            waiting.append(entry)
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if ((st.st_dev, st.st_ino) != (entry["device"], entry["inode"]) or st.st_uid != 0
                    or (entry.get("generation") is not None and inode_generation(fd) != entry["generation"])
                    or stat.S_IMODE(st.st_mode) != 0o600 or not stat.S_ISREG(st.st_mode)
                    or os.readlink(f"/proc/self/fd/{fd}") != path):
                continue
            try:
                hold_image(fd)
            except BlockingIOError:
                waiting.append(entry)       # a repair still holds it
                continue
            os.fchown(fd, int(entry["uid"]), int(entry["gid"]))
            os.fchmod(fd, int(entry["mode"]) & 0o777)
            given_back.append(path)
        finally:
            os.close(fd)        # and with it the lock taken to check
    if waiting:
        with open(record, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(entry) + "\n" for entry in waiting)
    else:
        os.unlink(record)
    return given_back
