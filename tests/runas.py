"""Run a command as another (unprivileged) user, even when this Python lives in a directory closed to them."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

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
