"""A bare D-Bus connection for measuring: calls sent as ready-made bytes, replies read without a client library.

A client library's own CPU (marshalling, decoding, futures) would be measured along with the daemon's;
on two cores, twenty such clients take as much CPU as the daemon they load. This connection leaves only
what any client must do: write the call, read the reply. Unix socket addresses only (the stack's).
"""

from __future__ import annotations

import os
import select
import socket
import struct
from dataclasses import dataclass

from dbus_fast import Message

_HEADER = struct.Struct("<BBBBIII")        # endianness, type, flags, version, body length, serial, fields length
_UINT32 = struct.Struct("<I")
_SERIAL_OFFSET = 8
_REPLY_SERIAL_FIELD = 5
_ERROR_NAME_FIELD = 4
METHOD_RETURN, ERROR = 2, 3


@dataclass
class RawReply:
    """A method return or error as received: its type, the serial it answers, its error name, its bytes."""
    type: int
    reply_serial: int
    error_name: str
    data: bytearray
    body_offset: int

    def first_string(self) -> str:
        """The body's first value, when it is a string or object path (as SubmitJob's job id)."""
        (length,) = _UINT32.unpack_from(self.data, self.body_offset)
        start = self.body_offset + 4
        return bytes(self.data[start:start + length]).decode()


class RawConnection:
    """EXTERNAL authentication and Hello, then calls: one at a time (call) or many in flight (send_again
    and next_reply). Signals are skipped (only our own NameAcquired can come: no match rules are added)."""

    def __init__(self, address: str):
        kind, _, params = address.partition(":")
        options = dict(p.split("=", 1) for p in params.split(",") if "=" in p)
        if kind != "unix" or not ({"path", "abstract"} & set(options)):
            raise ValueError(f"unsupported bus address {address}")
        where = options.get("path") or "\0" + options["abstract"]
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(where)
        self._pending = bytearray()
        self._serial = 0
        self._sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
        answer = self._line()
        if not answer.startswith(b"OK "):
            raise ConnectionError(f"authentication refused: {answer!r}")
        self._sock.sendall(b"BEGIN\r\n")
        hello = self.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                  interface="org.freedesktop.DBus", member="Hello"))
        self.unique_name = _parse_reply(hello).first_string()

    def __enter__(self) -> "RawConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def call(self, message: Message) -> bytearray:
        """Send `message` and wait: the whole reply (or error) to it, as received."""
        self._serial += 1
        message.serial = self._serial
        self._sock.sendall(message._marshall(False))
        while True:
            reply = self.next_reply()
            if reply.reply_serial == self._serial:
                return reply.data

    def send_wire(self, wire: bytes | bytearray) -> None:
        """Send a whole marshalled message as it is (its serial included)."""
        self._sock.sendall(wire)

    def next_message(self) -> bytearray:
        """The next message to arrive, of any type, as received."""
        return self._message()

    def send_again(self, wire: bytearray) -> int:
        """Send a marshalled call (bytearray(message._marshall(False))) under a new serial; that serial.
        Its serial is overwritten in place, so one buffer serves every call of the same content."""
        self._serial += 1
        _UINT32.pack_into(wire, _SERIAL_OFFSET, self._serial)
        self._sock.sendall(wire)
        return self._serial

    def reply_within(self, seconds: float) -> bool:
        """Whether bytes of a message are at hand now or arrive within `seconds` (next_reply will not wait
        long then)."""
        if self._pending:
            return True
        readable, _, _ = select.select([self._sock], [], [], max(0.0, seconds))
        return bool(readable)

    def next_reply(self) -> RawReply:
        """The next method return or error to arrive."""
        while True:
            data = self._message()
            if data[1] in (METHOD_RETURN, ERROR):
                return _parse_reply(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self._pending:
            self._receive_some()
        line, _, rest = bytes(self._pending).partition(b"\r\n")
        self._pending = bytearray(rest)
        return line

    def _receive_some(self) -> None:
        chunk = self._sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the bus closed the connection")
        self._pending += chunk

    def _message(self) -> bytearray:
        while len(self._pending) < 16:
            self._receive_some()
        if self._pending[0:1] != b"l":
            raise ValueError("only little-endian messages are read")
        *_, body_length, _serial, fields_length = _HEADER.unpack_from(self._pending, 0)
        total = 16 + fields_length + (-fields_length % 8) + body_length
        message = bytearray(total)
        have = min(len(self._pending), total)
        message[:have] = self._pending[:have]
        del self._pending[:have]
        view = memoryview(message)
        while have < total:
            got = self._sock.recv_into(view[have:], total - have)
            if not got:
                raise ConnectionError("the bus closed the connection")
            have += got
        return message


def _parse_reply(data: bytearray) -> RawReply:
    """The header fields a reply is matched by (D-Bus specification, "Message Format"): an array of
    (byte code, variant) structs, each aligned to 8, after the 16-byte fixed header."""
    _endian, kind, _flags, _version, _body, _serial, fields_length = _HEADER.unpack_from(data, 0)
    offset, end = 16, 16 + fields_length
    reply_serial, error_name = 0, ""
    while offset < end:
        offset += -offset % 8
        code, signature_length = data[offset], data[offset + 1]
        signature = chr(data[offset + 2])
        offset += 3 + signature_length
        if signature == "g":
            length = data[offset]
            offset += 1 + length + 1
            continue
        offset += -offset % 4
        (value,) = _UINT32.unpack_from(data, offset)
        offset += 4
        if signature in "so":
            if code == _ERROR_NAME_FIELD:
                error_name = bytes(data[offset:offset + value]).decode()
            offset += value + 1
        elif code == _REPLY_SERIAL_FIELD:
            reply_serial = value
    return RawReply(kind, reply_serial, error_name, data, end + (-end % 8))


def message_body(data: bytearray) -> bytes:
    """A received message's body: what follows its header, padded to 8."""
    (fields_length,) = _UINT32.unpack_from(data, 12)
    end = 16 + fields_length
    return bytes(data[end + (-end % 8):])


def with_body(message: Message, body: bytes) -> bytes:
    """`message` (its signature set, its serial too, its body any value of that signature) carrying `body`,
    bytes already marshalled for that signature (as message_body gives them), on the wire."""
    template = message._marshall(False)
    (old_length,) = _UINT32.unpack_from(template, 4)
    wire = bytearray(template[:len(template) - old_length]) + body
    _UINT32.pack_into(wire, 4, len(body))
    return bytes(wire)
