"""How h2kctl shows things to people: sizes, times, user names, tables, nested reports and the pager."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from datetime import datetime
from typing import Any, Iterable, TextIO

_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]


def human_bytes(n: int | float) -> str:
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # not reached


def human_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}min {seconds}s" if seconds else f"{minutes}min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}min" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"


def clock(seconds: float) -> str:
    """An ETA as H:MM:SS or M:SS."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def age(usec: int, now: float | None = None) -> str:
    if not usec:
        return "-"
    return human_duration((now if now is not None else time.time()) - usec / 1e6)


def timestamp(usec: int) -> str:
    """A time like systemd shows it: 'Tue 2024-05-07 10:11:12 UTC'; 'n/a' for 0."""
    if not usec:
        return "n/a"
    return datetime.fromtimestamp(usec / 1e6).astimezone().strftime("%a %Y-%m-%d %H:%M:%S %Z")


def iso_time(usec: int) -> str | None:
    if not usec:
        return None
    return datetime.fromtimestamp(usec / 1e6).astimezone().isoformat(timespec="seconds")


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


def percent(progress: float, known: bool = True) -> str:
    if not known or progress < 0:
        return "-"
    return f"{progress * 100:.0f}%"


def table(headers: list[str], rows: Iterable[list[str]], out: TextIO, legend: bool = True) -> None:
    """Columns padded to their widest cell; the last column is not padded."""
    rows = [list(map(str, r)) for r in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]

    def line(cells: list[str]) -> str:
        padded = [cell.ljust(w) for cell, w in zip(cells[:-1], widths[:-1])] + [cells[-1]]
        return " ".join(padded).rstrip()

    if legend:
        out.write(line(headers) + "\n")
    for row in rows:
        out.write(line(row) + "\n")


def nested(value: Any, out: TextIO, indent: int = 0) -> None:
    """A JSON-like value as indented 'key: value' lines (for reports)."""
    pad = "  " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                out.write(f"{pad}{key}:\n")
                nested(item, out, indent + 1)
            else:
                out.write(f"{pad}{key}: {_scalar(item)}\n")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)) and item:
                out.write(f"{pad}-\n")
                nested(item, out, indent + 1)
            else:
                out.write(f"{pad}- {_scalar(item)}\n")
    else:
        out.write(f"{pad}{_scalar(value)}\n")


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return "{}" if isinstance(value, dict) else "[]"
    return str(value)


def page(text: str, use_pager: bool) -> None:
    """Write text to stdout, through a pager (as systemd does: $SYSTEMD_PAGER, $PAGER, less) when it
    is longer than the terminal and paging was not turned off."""
    if use_pager and sys.stdout.isatty() and text.count("\n") > shutil.get_terminal_size().lines - 1:
        pager = os.environ.get("H2KCTL_PAGER") or os.environ.get("SYSTEMD_PAGER") or os.environ.get("PAGER")
        if pager not in ("", "cat"):
            command = pager or ("less" if shutil.which("less") else None)
            if command:
                env = dict(os.environ)
                env.setdefault("LESS", "FRSXMK")
                try:
                    subprocess.run(command, shell=True, input=text.encode(), env=env, check=False)
                    return
                except OSError:
                    pass
    sys.stdout.write(text)
