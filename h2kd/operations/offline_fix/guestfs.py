"""Files of a mounted guest, reached safely: every path is resolved as the guest would resolve it (its
symbolic links are followed inside the guest's root, never out of it), and every change keeps a backup.

The guest is untrusted input: a link such as /etc/fstab -> /etc/shadow must name the guest's file, not
the host's; any name the guest may already hold (a device node, a FIFO) is never opened for writing; and a
file too large to be read whole is refused rather than rewritten from a part of it.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import PurePosixPath

from h2kd.operations.qemuimg import OperationError

BACKUP_SUFFIX = ".h2k-backup"
MAX_LINKS = 40
# The most read of one guest file. Configuration files are far smaller; what is larger is refused whole.
MAX_TEXT_BYTES = 4 * 1024 * 1024
_TEMP_TRIES = 16


class GuestFS:
    """The guest's tree mounted at `root`. Paths given to it are guest paths ("/etc/fstab").

    dry_run: changes are recorded in `planned` but not written.
    """

    def __init__(self, root: str, dry_run: bool = False):
        self.root = os.path.realpath(root)
        self.dry_run = dry_run
        self.changed: list[str] = []

    # ---- resolving
    def host_path(self, guest_path: str) -> str:
        """The host path of a guest path, its links resolved within the guest root."""
        parts = [p for p in PurePosixPath("/" + guest_path.lstrip("/")).parts[1:] if p not in ("", ".")]
        resolved: list[str] = []
        links = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = os.path.join(self.root, *resolved, part)
            try:
                st = os.lstat(candidate)
            except (FileNotFoundError, NotADirectoryError):
                resolved.append(part)
                continue
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise OSError(f"too many symbolic links in the guest path {guest_path}")
                target = os.readlink(candidate)
                if target.startswith("/"):
                    resolved = []
                parts = [p for p in PurePosixPath(target).parts if p not in ("", ".", "/")] + parts
                continue
            resolved.append(part)
        return os.path.join(self.root, *resolved)

    def exists(self, guest_path: str) -> bool:
        return os.path.exists(self.host_path(guest_path))

    def is_file(self, guest_path: str) -> bool:
        return os.path.isfile(self.host_path(guest_path))

    def is_dir(self, guest_path: str) -> bool:
        return os.path.isdir(self.host_path(guest_path))

    def listdir(self, guest_path: str) -> list[str]:
        try:
            return sorted(os.listdir(self.host_path(guest_path)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def find_case_insensitive(self, guest_path: str) -> str | None:
        """The guest path that matches guest_path ignoring case (Windows trees), or None."""
        current = "/"
        for part in [p for p in guest_path.split("/") if p]:
            match = next((n for n in self.listdir(current) if n.lower() == part.lower()), None)
            if match is None:
                return None
            current = current.rstrip("/") + "/" + match
        return current

    # ---- reading
    def read_text(self, guest_path: str, limit: int = MAX_TEXT_BYTES) -> str | None:
        """The file's text, None when it is not a regular file; INVALID_IMAGE when it is larger than `limit`
        bytes: the fixes rewrite what they read, and a part written back in place of the whole would lose
        the rest of the file."""
        path = self.host_path(guest_path)
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise OperationError("INVALID_IMAGE", f"the guest's {guest_path} is larger than {_size(limit)}, the most "
                                 "offline_fix reads of a file, so it cannot be checked or repaired; make it smaller "
                                 "(or remove it) and run the repair again", "offline_fix")
        return data.decode("utf-8", errors="surrogateescape")

    # ---- changing (each change keeps the original as <file>.h2k-backup)
    def write_text(self, guest_path: str, text: str) -> bool:
        """Replace a file's text; False (and nothing written) when it is already that text."""
        if self.read_text(guest_path) == text:
            return False
        self.changed.append(guest_path)
        if self.dry_run:
            return True
        path = self.host_path(guest_path)
        mode, uid, gid = 0o644, 0, 0
        if os.path.isfile(path):
            st = os.stat(path)
            mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
            self._backup(path)
        fd, temp = _new_file(path)
        try:
            try:
                data = memoryview(text.encode("utf-8", errors="surrogateescape"))
                while data:
                    data = data[os.write(fd, data):]
                os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        return True

    def remove(self, guest_path: str) -> bool:
        """Move a file aside as its backup (so it takes no effect); False when there is no such file."""
        path = self.host_path(guest_path)
        if not os.path.lexists(path) or os.path.isdir(path):
            return False
        self.changed.append(guest_path)
        if self.dry_run:
            return True
        backup = path + BACKUP_SUFFIX
        if os.path.lexists(backup):
            os.unlink(path)        # the older backup is the original
        else:
            os.rename(path, backup)
        return True

    def _backup(self, path: str) -> None:
        backup = path + BACKUP_SUFFIX
        if os.path.lexists(backup):
            return                 # a backup from an earlier run holds the original: keep it
        with open(path, "rb") as src:
            data = src.read()
        st = os.stat(path)
        fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, stat.S_IMODE(st.st_mode))
        try:
            os.write(fd, data)
            os.fchown(fd, st.st_uid, st.st_gid)
        finally:
            os.close(fd)


def _new_file(path: str) -> tuple[int, str]:
    """A new, empty regular file next to `path` (descriptor, path), under a name no one could have chosen
    beforehand. The guest may hold any name already, as a FIFO (an open that never returns) or a device node
    (whatever it names would be written): O_EXCL never opens what is there, and no name of the guest's is
    removed either (an entry such as <file>.h2k-tmp, which earlier versions used, is left as it is)."""
    directory, name = os.path.split(path)
    for _ in range(_TEMP_TRIES):
        # A leading dot: a leftover (the worker killed outright) is a hidden file that no tool reading a
        # directory of configuration (interfaces.d, NetworkManager's profiles) takes for one of its own.
        temp = os.path.join(directory, f".{name}.h2k-tmp-{secrets.token_hex(8)}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"the new copy of {name} was not made as a regular file")
        return fd, temp
    raise FileExistsError(f"no new copy of {name} could be made: every name tried was taken")


def _size(limit: int) -> str:
    mib = 1024 * 1024
    return f"{limit // mib} MiB ({limit} bytes)" if limit % mib == 0 else f"{limit} bytes"
