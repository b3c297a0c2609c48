"""Object paths of jobs and workers: ids escaped the way systemd's bus_path_encode() escapes a label."""

from __future__ import annotations

from functools import lru_cache

from h2kd import JOB_PATH_PREFIX, WORKER_PATH_PREFIX


# A byte as it stands in an escaped label after the first character (letters and digits kept) and as the
# first character (letters only).
_ESCAPED_BYTE = tuple(chr(b) if chr(b).isascii() and chr(b).isalnum() else f"_{b:02x}" for b in range(256))
_ESCAPED_FIRST_BYTE = tuple(c if c.isalpha() else f"_{b:02x}" for b, c in enumerate(_ESCAPED_BYTE))


def escape_label(label: str) -> str:
    """Keep ASCII letters (and digits after the first character); every other byte becomes _xx (lower hex).

    The empty label becomes "_". Same rules as systemd, so `busctl` users see familiar paths.
    """
    if not label:
        return "_"
    data = label.encode()
    return _ESCAPED_FIRST_BYTE[data[0]] + "".join([_ESCAPED_BYTE[b] for b in data[1:]])


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


def job_id_of(path: str) -> str:
    """The job id a job's object path stands for (the inverse of job_path); the label as it is if it is not one
    job_path() makes."""
    label = path[len(JOB_PATH_PREFIX):]
    try:
        return unescape_label(label)
    except ValueError:
        return label


def worker_path(worker_id: str) -> str:
    return WORKER_PATH_PREFIX + escape_label(worker_id)
