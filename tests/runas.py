"""Run a command as another (unprivileged) user, even when this Python lives in a directory closed to them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

USERNS_STAGING = Path(tempfile.gettempdir()) / "h2k-test-userns"   # an empty mount point, see as_user


def _hidden_ancestor(path: Path) -> Path | None:
    """The first directory above path that other users cannot enter (e.g. /root for a pyenv Python)."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def as_user(user: str, argv: list[str]) -> list[str]:
    """argv run as `user`. When this Python lives under a directory closed to other users (/root here),
    the user could not even start h2kctl; so, in a private mount namespace only, that directory is
    covered by an empty tmpfs with just the interpreter's tree bind-mounted back. The machine is unchanged."""
    interpreter = Path(os.path.realpath(sys.executable))
    closed = _hidden_ancestor(interpreter)
    if closed is None:
        return ["runuser", "-u", user, "--", *argv]
    inner = closed / interpreter.relative_to(closed).parts[0]
    USERNS_STAGING.mkdir(mode=0o700, exist_ok=True)
    staging = str(USERNS_STAGING)
    script = ('mount --bind "$1" "$2" && mount -t tmpfs -o mode=0755 tmpfs "$3" && mkdir -p "$1" && '
              'mount --bind "$2" "$1" && shift 3 && exec runuser -u "$@"')
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(inner), staging,
            str(closed), user, "--", *argv]


@contextlib.contextmanager
def user_in_group(prefix: str, group: str | None = "h2k") -> Iterator[str]:
    """A real user (named prefix + a random suffix), in `group` if given (made for the while if missing); both
    removed afterwards, with the mount point as_user may have made."""
    made_group = group is not None and subprocess.run(["getent", "group", group], capture_output=True).returncode != 0
    if made_group:
        subprocess.run(["groupadd", "--system", group], check=True)
    name = prefix + uuid.uuid4().hex[:6]
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    *(["--groups", group] if group else []), name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False)
        if made_group:
            subprocess.run(["groupdel", group], check=False)
        if USERNS_STAGING.exists():
            USERNS_STAGING.rmdir()
