"""Replies that are one long array (GetManagedObjects, ListJobs) assembled from elements marshalled in
advance, byte for byte what dbus-fast sends.

With 10,000 jobs the GetManagedObjects reply is ~13 MB of 250,000 variants and the ListJobs reply 80,000
values; marshalling them on every call took most of a second and ~35 ms. Each job's part of a reply changes
only when that job changes, so it is marshalled once (object_entry, struct_bytes) and a call only joins the
parts (array_reply).

Why the parts can be joined (D-Bus specification, "Marshaling"): every value is aligned relative to the
start of the message, and the padding before a value depends only on its offset. A reply's body of
signature a{...} or a(...) is

    uint32 array length | zero padding to 8 | element | padding to 8 | element | ... | element

(the body starts 8-aligned, since the header is padded to 8; a dict entry or struct is aligned to 8, and
the padding before the first one is always written and never counted in the array length, even when the
array is empty). A dict entry {o a{sa{sv}}} is laid out exactly like a struct (o a{sa{sv}}), and a struct
marshalled on its own from offset 0 has the bytes it has at any offset that is a multiple of 8: every
alignment inside it (4 for the lengths, 8 for inner structs and for "t"/"d" values) is the same modulo 8.
The array length counts the elements and the padding between them, not the padding after the last one
(nothing follows it: the body ends there).

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
from dbus_fast.signature import Variant, get_signature_tree

REPLY_SIGNATURE = "a{oa{sa{sv}}}"      # GetManagedObjects
_ENTRY_SIGNATURE = "(oa{sa{sv}})"
_EMPTY_ARRAY = bytes(8)              # length 0 + the padding before the (absent) first entry
_PADDING = tuple(bytes(n) for n in range(8))
_UINT32 = struct.Struct("<I")
_BODY_LENGTH_OFFSET = 4
MAX_ARRAY_LENGTH = 64 * 1024 * 1024     # specification: an array's length is at most 2^26
# The specification allows 2^27 bytes, but dbus-daemon's system bus takes at most 32 MiB (max_message_size)
# and drops the connection that sends more: h2kd's own, every client's calls lost with it.
MAX_MESSAGE_LENGTH = 32 * 1024 * 1024


class ReplyTooLarge(ValueError):
    """The reply would exceed what a bus takes: the bus would drop the connection sending it."""


def _is_array_of_structs(signature: str) -> bool:
    """Whether the signature is one array whose elements are structs or dict entries (aligned to 8)."""
    types = get_signature_tree(signature).types
    return len(types) == 1 and types[0].token == "a" and types[0].children[0].token in "({"


def struct_bytes(signature: str, values: list[Any]) -> bytes:
    """A struct of signature "(...)" as it stands in an array (at an offset that is a multiple of 8)."""
    return bytes(Marshaller(signature, [values]).marshall())


def object_entry(path: str, interfaces: dict[str, dict[str, Variant]]) -> bytes:
    """One object's {o a{sa{sv}}} entry as it stands in a GetManagedObjects reply."""
    return struct_bytes(_ENTRY_SIGNATURE, [path, interfaces])


def array_reply(reply: Message, elements: Iterable[bytes]) -> bytearray:
    """The whole wire message: `reply` (a method return whose signature is one array of dict entries or
    structs, with its serial set; its body is ignored) carrying `elements` (from object_entry or
    struct_bytes, of the array's element type) as that array, in that order.

    Raises ReplyTooLarge if the reply would exceed what a bus takes (MAX_MESSAGE_LENGTH)."""
    if not reply.serial or not _is_array_of_structs(reply.signature):
        raise RuntimeError("a numbered method return of signature a{...} or a(...) is needed")
    reply.body = [{} if reply.signature.startswith("a{") else []]
    template = reply._marshall(False)
    header_end = len(template) - len(_EMPTY_ARRAY)
    if template[header_end:] != _EMPTY_ARRAY or template[0:1] != b"l" or header_end % 8:
        raise RuntimeError(f"dbus-fast marshals an empty {reply.signature} reply differently than expected")

    parts: list[Any] = [memoryview(template)[:header_end], _EMPTY_ARRAY]
    array_length = 0
    for element in elements:
        misalignment = array_length & 7
        if misalignment:
            parts.append(_PADDING[8 - misalignment])
            array_length += 8 - misalignment
        parts.append(element)
        array_length += len(element)
    body_length = len(_EMPTY_ARRAY) + array_length
    if array_length > MAX_ARRAY_LENGTH or header_end + body_length > MAX_MESSAGE_LENGTH:
        raise ReplyTooLarge(f"{reply.signature} reply too large: {array_length} bytes of elements")

    message = bytearray().join(parts)
    _UINT32.pack_into(message, _BODY_LENGTH_OFFSET, body_length)
    _UINT32.pack_into(message, header_end, array_length)
    return message
