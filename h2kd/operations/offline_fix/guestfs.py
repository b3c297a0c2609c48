"""Files of a mounted guest, reached safely: every path is resolved as the guest would resolve it (its
symbolic links are followed inside the guest's root, never out of it), and every change keeps a backup.

The guest is untrusted input: a link such as /etc/fstab -> /etc/shadow must name the guest's file, not
the host's.
"""

from __future__ import annotations

import os
import stat
from pathlib import PurePosixPath

BACKUP_SUFFIX = ".h2k-backup"
MAX_LINKS = 40


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
    def read_text(self, guest_path: str, limit: int = 4 * 1024 * 1024) -> str | None:
        path = self.host_path(guest_path)
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="surrogateescape")

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
        temp = f"{path}.h2k-tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            os.write(fd, text.encode("utf-8", errors="surrogateescape"))
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
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
