"""GetManagedObjects replies assembled from entries marshalled in advance, byte for byte what dbus-fast sends.

With 10,000 jobs the reply is ~13 MB of 250,000 variants; marshalling it on every call took most of a
second. Each object's part of the reply changes only when that object changes, so it is marshalled once
(object_entry) and a call only joins the parts (managed_objects_reply).

Why the parts can be joined (D-Bus specification, "Marshaling"): every value is aligned relative to the
start of the message, and the padding before a value depends only on its offset. The reply's body, of
signature a{oa{sa{sv}}}, is

    uint32 array length | zero padding to 8 | entry | padding to 8 | entry | ... | entry

(the body starts 8-aligned, since the header is padded to 8; a dict entry is aligned to 8 like a struct,
and the padding before the first one is always written and never counted in the array length, even when
the array is empty). A dict entry {o a{sa{sv}}} is laid out exactly like a struct (o a{sa{sv}}), so a
struct marshalled on its own from offset 0 has the bytes that entry has at any offset that is a multiple
of 8: every alignment inside it (4 for the lengths, 8 for the inner dict entries and for "t"/"d" values)
is the same modulo 8. The array length counts the entries and the padding between them, not the
padding after the last one (nothing follows it: the body ends there).

The header comes from dbus-fast itself: the reply with an empty array is marshalled (Message._marshall,
the only way dbus-fast 5.2 offers to marshal a message; the writer queue uses its result as is), and its
8-byte body is replaced, with the header's body length (uint32 at offset 4, little-endian: dbus-fast writes
"l" as the first byte) patched to the new size.
"""

from __future__ import annotations

import struct
from typing import Any, Iterable

from dbus_fast import Message
from dbus_fast._private.marshaller import Marshaller
from dbus_fast.signature import Variant

REPLY_SIGNATURE = "a{oa{sa{sv}}}"
_ENTRY_SIGNATURE = "(oa{sa{sv}})"
_EMPTY_ARRAY = bytes(8)              # length 0 + the padding before the (absent) first entry
_PADDING = tuple(bytes(n) for n in range(8))
_UINT32 = struct.Struct("<I")
_BODY_LENGTH_OFFSET = 4
MAX_ARRAY_LENGTH = 64 * 1024 * 1024     # specification: an array's length is at most 2^26
MAX_MESSAGE_LENGTH = 128 * 1024 * 1024  # specification: a message is at most 2^27 bytes


def object_entry(path: str, interfaces: dict[str, dict[str, Variant]]) -> bytes:
    """One object's {o a{sa{sv}}} entry as it stands in the reply (at an offset that is a multiple of 8)."""
    return bytes(Marshaller(_ENTRY_SIGNATURE, [(path, interfaces)]).marshall())


def managed_objects_reply(reply: Message, entries: Iterable[bytes]) -> bytearray:
    """The whole wire message: `reply` (a method return of signature a{oa{sa{sv}}} with its serial set; its
    body is ignored) carrying `entries` (from object_entry) as its dictionary, in that order.

    Raises ValueError if the reply would exceed the specification's limits (the bus would drop us)."""
    if reply.signature != REPLY_SIGNATURE or not reply.serial:
        raise ValueError("a numbered method return of signature a{oa{sa{sv}}} is needed")
    reply.body = [{}]
    template = reply._marshall(False)
    header_end = len(template) - len(_EMPTY_ARRAY)
    if template[header_end:] != _EMPTY_ARRAY or template[0:1] != b"l" or header_end % 8:
        raise RuntimeError("dbus-fast marshals an empty a{oa{sa{sv}}} reply differently than expected")

    parts: list[Any] = [memoryview(template)[:header_end], _EMPTY_ARRAY]
    array_length = 0
    for entry in entries:
        misalignment = array_length & 7
        if misalignment:
            parts.append(_PADDING[8 - misalignment])
            array_length += 8 - misalignment
        parts.append(entry)
        array_length += len(entry)
    body_length = len(_EMPTY_ARRAY) + array_length
    if array_length > MAX_ARRAY_LENGTH or header_end + body_length > MAX_MESSAGE_LENGTH:
        raise ValueError(f"GetManagedObjects reply too large: {array_length} bytes of objects")

    message = bytearray().join(parts)
    _UINT32.pack_into(message, _BODY_LENGTH_OFFSET, body_length)
    _UINT32.pack_into(message, header_end, array_length)
    return message
