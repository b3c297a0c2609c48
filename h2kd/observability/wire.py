"""journald's native protocol and sd_notify, spoken directly: one datagram each, no library.

The daemon journals an entry for every submission, and a worker must start fast: building the datagram
ourselves costs a fraction of systemd-python's journal.send(), and imports nothing but `socket`.
"""

from __future__ import annotations

import re
import socket
from typing import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SEND_BUFFER = 8 * 1024 * 1024

_sockets: list[socket.socket] = []


def send_datagram(address: str, payload: bytes) -> None:
    """Send one datagram to a unix socket ("@name": the abstract namespace). Raises OSError."""
    if not _sockets:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:  # room for a burst of entries before a send waits for journald (as sd-journal does)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass
        _sockets.append(sock)
    _sockets[0].sendto(payload, "\0" + address[1:] if address.startswith("@") else address)


_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def one_line(text: str) -> str:
    """text with its control characters, and any lone surrogate, as escapes (\\x0a, \\udcff). What a worker
    prints, journald reads from the unit's stream line by line, a line ending at a newline or a NUL and its
    priority read from a leading "<N>": text that came from an image or a guest (a file name, a program's last
    words) must stay one line of its own, and a name that is not UTF-8 must not make the print fail."""
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def journal_entry(fields: Mapping[str, str]) -> bytes:
    """An entry in the native protocol: KEY=value lines; a value holding a newline goes as KEY, its
    length (64-bit little-endian) and its bytes. A lone surrogate (a guest's file name that is not UTF-8, read
    with surrogateescape) goes as its escape, \\udcff: the entry stays text, and is written."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "backslashreplace")
        if b"\n" in data:
            out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def send_journal(fields: Mapping[str, str]) -> None:
    """Write one journal entry (MESSAGE, PRIORITY, ... as given). Raises OSError: no journald, or an entry
    too large for one datagram."""
    send_datagram(JOURNAL_SOCKET, journal_entry(fields))
