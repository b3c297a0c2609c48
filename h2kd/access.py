"""File access as the caller: could this uid, with these groups, read a source or create an output?

h2kd runs as root, so its own view of permissions proves nothing about the caller. Each check
that matters is made in a short-lived child process that has dropped to the caller's uid and
groups and tries the real thing: it opens the source O_RDONLY|O_NOFOLLOW, or asks access(2) for
write and search permission on the output directory (which also sees ACLs and read-only mounts).
Paths are confined as well: a source's final component may not be a symlink, and sources and
output directories must resolve (symlinks followed) below the configured roots.

A file descriptor the caller passed over the bus needs no permission check (the caller opened
it), only `check_source_fd`.

Errors: NotAuthorized (the caller may not), InvalidArgument (the path is not usable),
AlreadyExists (the output is there already).
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import select
import signal
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from h2kd.errors import AlreadyExists, H2kError, InvalidArgument, NotAuthorized

# The group an output made for a uid without a passwd entry gets (Debian's "nogroup"); never a group to act with.
NO_GROUP = 65534
# How long a check as the caller may take. It runs on the daemon's event loop (it takes about a millisecond):
# a lookup that hangs must not hold every other call, nor the watchdog, for longer.
CALLER_CHECK_SECONDS = 5.0
# Files checked by one child, within its CALLER_CHECK_SECONDS: 150 ms each, for a slow network file system.
_PATHS_PER_CHILD = 32
_UNREAPED: set[int] = set()     # children of _as_caller not yet waited for
STALLED_PAUSE_SECONDS = 60.0
_STALLED: dict[int, float] = {}     # uid -> time.monotonic() when a check as them last hung


def caller_groups(uid: int) -> list[int]:
    """The groups a login of `uid` would have: primary gid first, then supplementary groups.
    An unknown uid has none."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return []
    return list(dict.fromkeys([entry.pw_gid, *os.getgrouplist(entry.pw_name, entry.pw_gid)]))


def acting_groups(uid: int, connection_groups: Iterable[int] | None = None) -> list[int]:
    """The groups h2kd acts with for `uid`: those of caller_groups() that the caller's connection had too
    (connection_groups, the bus's UnixGroupIDs at submission; None when not known: all of caller_groups()).

    As the kernel would for the caller's own process, a group it dropped (setpriv --clear-groups, a sandbox)
    is not given back through h2kd; and as the user database says now, a group the user was removed from
    since the submission is gone for their queued jobs too."""
    groups = caller_groups(uid)
    if connection_groups is None:
        return groups
    had = set(connection_groups)
    return [gid for gid in groups if gid in had]


# In a worker: the groups h2kd acts with for a submitter, from the attempt's envelope (give_groups).
_GIVEN_GROUPS: dict[int, list[int]] = {}


def give_groups(uid: int, groups: Iterable[int]) -> None:
    """The groups to act with for `uid` in this process (a worker: those h2kd worked out at submission and
    wrote in the attempt's envelope), in place of a user database lookup, which the unit may not reach."""
    _GIVEN_GROUPS[uid] = [int(g) for g in groups]


def forget_groups(uid: int) -> None:
    """Act for `uid` with the user database's groups again (see give_groups)."""
    _GIVEN_GROUPS.pop(uid, None)


def groups_for(uid: int) -> list[int]:
    """The groups given for `uid` (give_groups), else those of the user database (caller_groups)."""
    given = _GIVEN_GROUPS.get(uid)
    return list(given) if given is not None else caller_groups(uid)


def output_owner(uid: int, group: str = "") -> tuple[int, int]:
    """Who an output made for `uid` belongs to: the caller, with `group` or else the caller's primary group."""
    if group:
        import grp
        return uid, grp.getgrnam(group).gr_gid
    try:
        return uid, pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid, NO_GROUP


def check_source_readable(path: str | os.PathLike[str], uid: int, gids: list[int],
                          allowed_roots: Iterable[str | os.PathLike[str]]) -> tuple[Path, os.stat_result]:
    """Return the resolved path of a source image the caller may read, and the file's status as checked
    (its identity is what the worker must find), or raise.

    The caller's own lookup comes first: what root can see but the caller cannot (a file in a directory
    closed to them, and whether it exists or what it is) gets the one answer "permission denied"."""
    given = _absolute(path)
    as_caller = _as_caller(uid, gids, _try_look_up_and_read, str(given)) if uid != 0 else None
    code = 0
    if as_caller is not None:
        code, device, inode, mode = as_caller
        if code in (errno.ENOENT, errno.ENOTDIR) and not mode:
            raise InvalidArgument(f"no such file: {given}")
        if code and not mode:
            raise _not_readable(given, uid, code)
        if stat.S_ISLNK(mode):
            raise _symlink_refused(given)
    try:
        # One lookup gives both the file's identity and where it really is (no window between the two).
        fd = os.open(given, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidArgument(f"no such file: {given}") from None
    except OSError as e:
        raise InvalidArgument(f"cannot use {given}: {e.strerror}") from None
    try:
        seen = os.fstat(fd)
        if stat.S_ISLNK(seen.st_mode):
            raise _symlink_refused(given)
        resolved = Path(_path_of(fd, given))
    finally:
        os.close(fd)
    if as_caller is not None and (device, inode) != (seen.st_dev, seen.st_ino):
        raise NotAuthorized(f"refusing {given}: it was replaced while being checked")
    roots = _resolved_roots(allowed_roots)
    if not _is_below(resolved, roots):
        raise NotAuthorized(
            f"refusing {given}: it resolves to {resolved}, outside the allowed source directories "
            f"({', '.join(map(str, roots))})"
        )
    if not stat.S_ISREG(seen.st_mode):
        raise InvalidArgument(f"{given} is not a regular file")
    if code == errno.ELOOP:
        raise NotAuthorized(f"refusing {given}: it became a symbolic link while being checked")
    if code:
        raise _not_readable(given, uid, code)
    return resolved, seen


def _not_readable(given: Path, uid: int, code: int) -> H2kError:
    if code in (errno.EACCES, errno.EPERM):
        return NotAuthorized(f"permission denied: {given} is not readable by uid {uid}")
    return InvalidArgument(f"cannot read {given} as uid {uid}: {os.strerror(code)}")


def _symlink_refused(given: Path) -> NotAuthorized:
    return NotAuthorized(f"refusing {given}: it is a symbolic link; give the path of the image itself")


def check_output_allowed(path: str | os.PathLike[str], uid: int, gids: list[int],
                         output_roots: Iterable[str | os.PathLike[str]], overwrite: bool = False) -> Path:
    """Return where an output may be created (its directory resolved), or raise.

    The directory must be below an output root and writable by the caller. A path naming an existing
    directory is the directory the outputs go in. Otherwise nothing may exist at the path, or, with
    overwrite, only a regular file of the caller's own: h2kd renames the new output over it as root, which
    must not let anyone replace a file that is not theirs (a sticky or group-writable directory allows it)."""
    given = _absolute(path)
    if given.name in ("", ".", ".."):
        raise InvalidArgument(f"{given} does not name a file")
    if uid != 0 and _as_caller(uid, gids, _try_look_up, str(given)) == (errno.EACCES,):
        # Root's lookup would tell what lies behind a directory closed to the caller (a directory or
        # nothing at all): they get the answer of any directory they cannot write.
        raise NotAuthorized(f"permission denied: {given.parent} is not writable by uid {uid}")
    try:
        existing: os.stat_result | None = os.lstat(given)
    except FileNotFoundError:
        existing = None
    except OSError as e:
        raise InvalidArgument(f"cannot use {given}: {e.strerror}") from None
    as_directory = existing is not None and stat.S_ISDIR(existing.st_mode)
    directory = Path(_real(given if as_directory else given.parent))
    roots = _resolved_roots(output_roots)
    if not _is_below(directory, roots):
        raise NotAuthorized(
            f"refusing {given}: outputs may only be written below {', '.join(map(str, roots))}"
        )
    if not directory.is_dir():
        raise InvalidArgument(f"{given.parent} is not an existing directory")
    check_directory_writable(str(directory), uid, gids)
    if as_directory:
        return directory
    target = directory / given.name
    if existing is None:
        return target
    if not overwrite:
        raise AlreadyExists(f"{target} already exists; outputs are never overwritten")
    if not stat.S_ISREG(existing.st_mode):
        raise AlreadyExists(f"{target} exists and is not a regular file; it is never replaced")
    if uid != 0 and existing.st_uid != uid:
        raise NotAuthorized(f"refusing to replace {target}: it belongs to uid {existing.st_uid}, not to uid {uid}")
    return target


def check_directory_writable(directory: str, uid: int, gids: list[int]) -> None:
    """The caller must be able to create files in `directory` (resolved) themselves: h2kd makes their outputs
    there as root. Raises NotAuthorized."""
    if uid == 0:
        return
    (code,) = _as_caller(uid, gids, _try_write_access, directory)
    if code:
        raise NotAuthorized(f"permission denied: {directory} is not writable by uid {uid}")


def check_directory_fd_writable(fd: int, directory: str, uid: int, gids: list[int]) -> None:
    """As check_directory_writable, for the directory open on fd, opened as `directory` (resolved): the caller
    must reach it by that name, find there the very directory that was opened (the one that will be written in,
    whatever is renamed on its path later), and be able to create files in it. Raises NotAuthorized."""
    if uid == 0:
        return
    (code,) = _as_caller(uid, gids, _try_opened_directory_writable, f"{fd}:{directory}")
    if code == errno.ESTALE:
        raise NotAuthorized(f"permission denied: the output directory {directory} was moved or replaced as it "
                            "was checked")
    if code:
        raise NotAuthorized(f"permission denied: {directory} is not writable by uid {uid}")


def check_source_fd(fd: int) -> os.stat_result:
    """A source passed as a file descriptor: it must be a regular file open for reading."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        info = os.fstat(fd)
    except OSError as e:
        raise InvalidArgument(f"unusable file descriptor: {e.strerror}") from None
    if flags & os.O_PATH or (flags & os.O_ACCMODE) == os.O_WRONLY:
        raise InvalidArgument("the file descriptor is not open for reading")
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument("the file descriptor does not refer to a regular file")
    return info


def _absolute(path: str | os.PathLike[str]) -> Path:
    given = Path(path)
    if not given.is_absolute():
        raise InvalidArgument(f"{path} is not an absolute path")
    return given


def _resolved_roots(roots: Iterable[str | os.PathLike[str]]) -> list[Path]:
    return [Path(_real(root)) for root in roots]


def _real(path: str | os.PathLike[str]) -> str:
    """os.path.realpath, asking the kernel (one open) rather than walking the path in Python."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return os.path.realpath(path)
    try:
        return _path_of(fd, path)
    finally:
        os.close(fd)


def _path_of(fd: int, path: str | os.PathLike[str]) -> str:
    """Where the open file `fd` (opened as `path`) is; realpath(path) where /proc is not there to tell.

    Raises NotAuthorized if that is not where h2kd finds the same file: a file reached through another mount
    namespace (/proc/PID/root/...) is named by its path there, which may lie below an allowed root here."""
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)
    opened = os.fstat(fd)
    try:
        found = os.stat(where, follow_symlinks=False)
    except OSError:
        found = None
    if found is None or (found.st_dev, found.st_ino) != (opened.st_dev, opened.st_ino):
        raise NotAuthorized(f"refusing {path}: it is not reachable from h2kd's root as {where}")
    return where


def _is_below(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def check_file_readable(path: str, device: int, inode: int, uid: int, gids: list[int]) -> None:
    """A file that root found at `path` (device, inode) must be one the caller could read as well, at the same
    path: for the files an image refers to (backing files, extents), which the caller never named. Raises
    NotAuthorized."""
    if uid == 0:
        return
    code = _opened_as_caller(uid, gids, _try_open_for_reading, path, (device, inode), path)
    if code:
        raise NotAuthorized(f"{path} is not readable by uid {uid}: {os.strerror(code)}")


def check_repairable_in_place(path: Path, output_roots: Iterable[str | os.PathLike[str]]) -> None:
    """An image repaired in place (offline_fix) is rewritten like an output, so it must lie below an output root,
    as outputs do, wherever the links on its path lead. Raises NotAuthorized."""
    roots = _resolved_roots(output_roots)
    if not _is_below(Path(_real(path)), roots):
        raise NotAuthorized(f"refusing {path}: offline_fix changes it in place, and images are changed only below "
                            f"the output roots ({', '.join(map(str, roots)) or 'none configured'}); a dry run may "
                            "read any image")


def check_image_writable(path: Path, device: int, inode: int, uid: int, gids: list[int]) -> None:
    """An image repaired in place (offline_fix, `path` resolved, device and inode as root checked it) must be one
    the caller could write itself: h2kd rewrites it as root. Raises NotAuthorized."""
    if uid == 0:
        return
    if _opened_as_caller(uid, gids, _try_open_for_writing, str(path), (device, inode), path):
        raise NotAuthorized(f"permission denied: {path} is not writable by uid {uid}, and a repair changes it")


def look_up_as(uid: int, gids: list[int], path: str) -> int:
    """The caller's own lookup of `path` (lstat, with their uid and groups): 0, or the errno that stopped it."""
    return _as_caller(uid, gids, _try_look_up, path)[0]


def kind_as(uid: int, gids: list[int], path: str) -> int:
    """The file type bits (stat.S_IFMT) of `path` as the caller's own lookup finds it (lstat), 0 when it fails."""
    return _as_caller(uid, gids, _try_kind, path)[0]


def _try_kind(path: str) -> tuple[int, ...]:
    try:
        return (stat.S_IFMT(os.lstat(path).st_mode),)
    except OSError:
        return (0,)


def look_up_and_open_each_as(uid: int, gids: list[int], paths: list[str]) -> list[tuple[int, int, int, int]]:
    """The caller's own lookup of each of `paths` and, for a regular file, their opening it for reading, in order:
    (errno or 0, device, inode, mode) each, mode 0 when the lookup itself failed. _PATHS_PER_CHILD to a child: a
    descriptor naming thousands of files costs a fork per batch, not per file."""
    found: list[tuple[int, int, int, int]] = []
    for start in range(0, len(paths), _PATHS_PER_CHILD):
        batch = paths[start:start + _PATHS_PER_CHILD]
        numbers = _as_caller(uid, gids, _try_look_up_and_read_each, "\0".join(batch),
                             shown=f"{len(batch)} files such as {batch[0]}")
        found += [tuple(numbers[i:i + 4]) for i in range(0, len(numbers), 4)]  # type: ignore[misc]
    return found


def _opened_as_caller(uid: int, gids: list[int], probe: Callable[[str], tuple[int, ...]], path: str,
                      checked: tuple[int, int], shown: object) -> int:
    """Open `path` as the caller (probe: _try_open_*); 0, or the errno that stopped them. NotAuthorized if what
    they opened is not the file root checked (`checked`: its device and inode)."""
    code, device, inode = _as_caller(uid, gids, probe, path)
    if not code and (device, inode) != checked:
        raise NotAuthorized(f"refusing {shown}: it was replaced while being checked")
    return code


def _try_look_up(path: str) -> tuple[int, ...]:
    try:
        os.lstat(path)
    except OSError as e:
        return (e.errno or errno.EIO,)
    return (0,)


def _try_look_up_and_read(path: str) -> tuple[int, ...]:
    """(errno, device, inode, mode) of the caller's lookup of `path`, then, for a regular file, of their
    opening it for reading. mode is 0 when the lookup itself failed."""
    try:
        found = os.lstat(path)
    except OSError as e:
        return (e.errno or errno.EIO, 0, 0, 0)
    if not stat.S_ISREG(found.st_mode):
        return (0, found.st_dev, found.st_ino, found.st_mode)
    code, device, inode = _try_open(path, os.O_RDONLY)
    return (code, device, inode, found.st_mode) if not code else (code, found.st_dev, found.st_ino, found.st_mode)


def _try_look_up_and_read_each(paths: str) -> tuple[int, ...]:
    return tuple(number for path in paths.split("\0") for number in _try_look_up_and_read(path))


def _try_open_for_reading(path: str) -> tuple[int, ...]:
    return _try_open(path, os.O_RDONLY)


def _try_open_for_writing(path: str) -> tuple[int, ...]:
    return _try_open(path, os.O_WRONLY)    # no O_TRUNC: the file is left as it is


def _try_open(path: str, mode: int) -> tuple[int, ...]:
    try:
        # O_NONBLOCK: should the file have been swapped for a FIFO, do not wait for a writer.
        fd = os.open(path, mode | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        return (e.errno or errno.EIO, 0, 0)
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    return (0, info.st_dev, info.st_ino)


def _try_write_access(directory: str) -> tuple[int, ...]:
    # In the child the real uid is the caller's, which is what access(2) checks.
    return (0,) if os.access(directory, os.W_OK | os.X_OK) else (errno.EACCES,)


def _try_opened_directory_writable(fd_and_path: str) -> tuple[int, ...]:
    fd_text, path = fd_and_path.split(":", 1)
    fd = int(fd_text)
    try:
        named = os.stat(path, follow_symlinks=False)     # reachable by the caller, by that name
    except OSError as e:
        return (e.errno or errno.EACCES,)
    opened = os.fstat(fd)
    if (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
        return (errno.ESTALE,)
    return (0,) if os.access(".", os.W_OK | os.X_OK, dir_fd=fd) else (errno.EACCES,)


def _as_caller(uid: int, gids: list[int], probe: Callable[[str], tuple[int, ...]], argument: str,
               shown: str = "") -> tuple[int, ...]:
    """Run `probe(argument)` in a child process with the caller's uid and groups; return its numbers. shown:
    what the argument is called in an error, when not itself.

    fork rather than a helper program: it costs about a millisecond, and the child only makes
    system calls before _exit."""
    stalled_at = _STALLED.get(uid)
    if stalled_at is not None and time.monotonic() - stalled_at < STALLED_PAUSE_SECONDS:
        # Each hung check holds the event loop CALLER_CHECK_SECONDS: a caller sending them one after another
        # would hold it past the watchdog's limit. Theirs wait until a while after the last one gave up.
        raise H2kError(f"a check of a file as uid {uid} did not finish within {CALLER_CHECK_SECONDS:g} s a moment "
                       f"ago; checks for uid {uid} resume {STALLED_PAUSE_SECONDS:g} s after it")
    if not gids:
        # A stand-in group ("nogroup") could reach what the caller cannot.
        raise NotAuthorized(f"uid {uid} has no group h2kd may act with; files are reached only with a caller's own "
                            "user and groups")
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 1
        try:
            os.close(reader)
            os.setgroups(gids)
            os.setgid(gids[0])
            os.setuid(uid)
            if os.getuid() != uid or os.geteuid() != uid:
                os._exit(1)
            os.write(writer, " ".join(map(str, probe(argument))).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(writer)
    deadline = time.monotonic() + CALLER_CHECK_SECONDS
    answer = b""
    try:
        waiting = select.poll()
        waiting.register(reader, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not waiting.poll(left * 1000):
                # A lookup hung in a file system the caller controls (a FUSE mount of theirs): the daemon waits
                # no longer, and the child is ended (a fatal signal interrupts a FUSE request).
                os.kill(pid, signal.SIGKILL)
                _reap(pid, wait=0.2)
                _STALLED[uid] = time.monotonic()
                raise H2kError(f"checking {shown or argument} as uid {uid} took longer than "
                               f"{CALLER_CHECK_SECONDS:g} s; is a file system on its path not answering?")
            chunk = os.read(reader, 256)
            if not chunk:
                break
            answer += chunk
    finally:
        os.close(reader)
    _, status = os.waitpid(pid, 0)     # the pipe closed: the child is exiting
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0 or not answer:
        raise H2kError(f"could not check file access as uid {uid}")
    return tuple(int(n) for n in answer.split())


def _reap(pid: int, wait: float) -> None:
    """Wait at most `wait` seconds for the killed child to end; one that has not (stuck beyond a fatal signal) is
    waited for at a later call rather than holding the daemon."""
    _UNREAPED.add(pid)
    deadline = time.monotonic() + wait
    while _UNREAPED:
        for child in list(_UNREAPED):
            try:
                done, _ = os.waitpid(child, os.WNOHANG)
            except ChildProcessError:
                done = child
            if done:
                _UNREAPED.discard(child)
        if pid not in _UNREAPED or time.monotonic() >= deadline:
            return
        time.sleep(0.01)
