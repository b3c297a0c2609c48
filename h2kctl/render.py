"""How h2kctl shows things to people: sizes, times, user names, tables, nested reports, the pager, and
the terminal-safe streams all of it is written through."""

from __future__ import annotations

import functools
import io
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from typing import Any, Iterable, TextIO

_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]

# What a terminal acts on instead of showing: C0 controls but tab and newline (escape sequences, carriage
# return, backspace), DEL, C1 controls, and the bidirectional overrides that reorder what is shown. And lone
# surrogates: in a C locale Python writes \udc80-\udcff as the raw bytes they stand for, which can spell any
# UTF-8 character (a C1 control, an override) after this filter has run.
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_safe(text: str) -> str:
    """`text` with every character a terminal would act on shown as an escape (\\x1b, \\u202e), as ls and
    systemctl show them. Much of what h2kctl prints comes from other users or from their disk images (error
    messages quoting an image's header, a guest's names, a ticket): none of it may drive the terminal of the
    administrator who reads it."""
    return _UNSAFE.sub(_escaped, text)


class TerminalSafe(io.TextIOBase):
    """A text stream passing everything written to it through terminal_safe(); h2kctl's own cursor
    movements (the progress bars) go through control()."""

    def __init__(self, raw: TextIO):
        self.raw = raw

    def write(self, text: str) -> int:
        safe = terminal_safe(text)
        try:
            self.raw.write(safe)
        except UnicodeEncodeError:
            # A character the stream's encoding lacks (a guest's name, a path, on a Latin-1 terminal): written as
            # an escape, rather than the whole output lost. The stream encodes all of `safe` before writing any.
            encoding = self.encoding or "ascii"
            self.raw.write(safe.encode(encoding, "backslashreplace").decode(encoding))
        return len(text)

    def control(self, sequence: str) -> None:
        self.raw.write(sequence)

    def flush(self) -> None:
        self.raw.flush()

    def isatty(self) -> bool:
        return self.raw.isatty()

    def fileno(self) -> int:
        return self.raw.fileno()

    @property
    def encoding(self) -> str:   # type: ignore[override]
        return getattr(self.raw, "encoding", "utf-8")


# h2kctl's own marks, and what stands for each where the output cannot show it: systemd's ASCII glyphs.
_ASCII_GLYPHS = {"✓": "+", "×": "x", "○": "*", "●": "*", "→": "->", "…": "..."}


def glyph(mark: str, stream: TextIO | None = None) -> str:
    """`mark` (one of _ASCII_GLYPHS) if `stream` (stdout by default) can encode it, else its ASCII stand-in, as
    systemctl falls back to ASCII outside a UTF-8 locale."""
    encoding = getattr(stream if stream is not None else sys.stdout, "encoding", None) or "ascii"
    try:
        mark.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return _ASCII_GLYPHS[mark]
    return mark


def control(stream: TextIO, sequence: str) -> None:
    """Write one of h2kctl's own terminal sequences, unescaped, to `stream` (a TerminalSafe or not)."""
    if isinstance(stream, TerminalSafe):
        stream.control(sequence)
    else:
        stream.write(sequence)


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


def local_time(usec: int) -> datetime | None:
    """The local time `usec` (microseconds since the epoch) names; None for 0 and for a time no calendar date
    holds: h2kd caps its times at 2**63-1, some 292,000 years ahead."""
    if not usec:
        return None
    try:
        return datetime.fromtimestamp(usec / 1e6).astimezone()
    except (ValueError, OverflowError, OSError):
        return None


def timestamp(usec: int) -> str:
    """A time like systemd shows it: 'Tue 2024-05-07 10:11:12 UTC'; 'n/a' for 0 or a time past year 9999."""
    when = local_time(usec)
    return when.strftime("%a %Y-%m-%d %H:%M:%S %Z") if when else "n/a"


def iso_time(usec: int) -> str | None:
    when = local_time(usec)
    return when.isoformat(timespec="seconds") if when else None


@functools.lru_cache(maxsize=1024)
def user_name(uid: int) -> str:
    """Looked up once per uid: `list` of 10,000 jobs would otherwise ask the user database (LDAP, with sssd)
    10,000 times."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


def percent(progress: float, known: bool = True) -> str:
    if not known or progress < 0:
        return "-"
    return f"{progress * 100:.0f}%"


def single_line(text: str) -> str:
    """terminal_safe(text) with line breaks and tabs shown as escapes too: for a table's cell, a progress bar, a
    line of a list, where a name or a reason another user chose must not pass for lines or columns of its own."""
    return terminal_safe(text).replace("\n", "\\n").replace("\t", "\\t")


def table(headers: list[str], rows: Iterable[list[str]], out: TextIO, legend: bool = True) -> None:
    """Columns padded to their widest cell (as shown: escaped first); the last column is not padded."""
    rows = [[single_line(str(cell)) for cell in r] for r in rows]
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
                out.write(f"{pad}{_one_line(str(key))}:\n")
                nested(item, out, indent + 1)
            else:
                out.write(f"{pad}{_one_line(str(key))}: {_scalar(item)}\n")
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
    return _one_line(str(value))


def _one_line(text: str) -> str:
    """A report's text comes from the image (an OVF's names): a line break in it must not pass for lines of the
    report itself."""
    return text.replace("\n", "\\n").replace("\r", "\\r")


# Where the pager asked for cannot be run, as systemd does: these, then no pager.
FALLBACK_PAGERS = ("less", "more")
# What sh exits with when it cannot run a command: found but not executable, not found.
_CANNOT_RUN = (126, 127)


def page(text: str, use_pager: bool) -> None:
    """Write text to stdout, through a pager (as systemd does: $SYSTEMD_PAGER, $PAGER, less) when it
    is longer than the terminal and paging was not turned off. A pager that cannot be run gives way to
    less, then more, then none: the output is never lost to a mistyped $PAGER."""
    if use_pager and sys.stdout.isatty() and text.count("\n") > shutil.get_terminal_size().lines - 1:
        # The first variable that is set decides, even when empty (as systemd reads SYSTEMD_PAGER=""): off.
        pager = next((os.environ[name] for name in ("H2KCTL_PAGER", "SYSTEMD_PAGER", "PAGER") if name in os.environ),
                     None)
        if pager not in ("", "cat"):
            env = dict(os.environ)
            env.setdefault("LESS", "FRSXMK")
            encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
            data = terminal_safe(text).encode(encoding, "backslashreplace")
            fallbacks = [p for p in FALLBACK_PAGERS if shutil.which(p)]
            sys.stdout.flush()
            for command in dict.fromkeys(([pager] if pager else []) + fallbacks):
                try:
                    ran = subprocess.run(command, shell=True, input=data, env=env, check=False)
                except OSError:
                    continue
                if ran.returncode not in _CANNOT_RUN:
                    return
    sys.stdout.write(text)
