"""Object paths of jobs and workers: ids escaped the way systemd's bus_path_encode() escapes a label."""

from __future__ import annotations

from functools import lru_cache

from h2kd import JOB_PATH_PREFIX, WORKER_PATH_PREFIX


def escape_label(label: str) -> str:
    """Keep ASCII letters (and digits after the first character); every other byte becomes _xx (lower hex).

    The empty label becomes "_". Same rules as systemd, so `busctl` users see familiar paths.
    """
    if not label:
        return "_"
    out = []
    for i, byte in enumerate(label.encode()):
        char = chr(byte)
        if (char.isascii() and char.isalpha()) or (i > 0 and char.isascii() and char.isdigit()):
            out.append(char)
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)


def unescape_label(escaped: str) -> str:
    """The inverse of escape_label()."""
    if escaped == "_":
        return ""
    raw = bytearray()
    i = 0
    while i < len(escaped):
        if escaped[i] == "_" and i + 3 <= len(escaped):
            raw.append(int(escaped[i + 1:i + 3], 16))
            i += 3
        else:
            raw.append(ord(escaped[i]))
            i += 1
    return raw.decode()


@lru_cache(maxsize=1 << 16)   # listings of thousands of jobs ask again and again
def job_path(job_id: str) -> str:
    return JOB_PATH_PREFIX + escape_label(job_id)


def worker_path(worker_id: str) -> str:
    return WORKER_PATH_PREFIX + escape_label(worker_id)
