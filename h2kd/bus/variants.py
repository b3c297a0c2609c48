"""a{sv} from callers into plain Python values, and plain Python values into typed a{sv} for replies.

Incoming: Variants are unwrapped recursively (dicts, arrays and structs included), so the core
sees the same shapes it would get from JSON. Outgoing: each key's D-Bus type is given explicitly,
because a Python int cannot say whether it is a u or a t.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from dbus_fast.signature import Variant

from h2kd.errors import InvalidArgument, InvalidSpec


def unwrap(value: Any) -> Any:
    """A D-Bus value (possibly Variants within Variants) as plain dict/list/str/int/float/bool/bytes."""
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {unwrap(k): unwrap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [unwrap(v) for v in value]
    return value


def spec_from_dbus(spec: Any) -> dict[str, Any]:
    """The job spec a caller sent as a{sv}, as the plain dict parse_spec() takes."""
    plain = unwrap(spec)
    if not isinstance(plain, dict):
        raise InvalidSpec("", "the job spec must be a dictionary (a{sv})")
    return plain


def options_from_dbus(options: Any, allowed: Mapping[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """Method options/filters: unknown keys and wrongly typed values are InvalidArgument."""
    plain = unwrap(options)
    for key, value in plain.items():
        kind = allowed.get(key)
        if kind is None:
            raise InvalidArgument(f"unknown option {key!r}; known: {', '.join(sorted(allowed))}")
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise InvalidArgument(f"option {key!r} has the wrong type")
    return plain


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def to_vardict(values: Mapping[str, Any], types: Mapping[str, str]) -> dict[str, Variant]:
    """Typed a{sv}: keys listed in `types` get that signature; others are guessed (ints as x, else JSON text)."""
    out: dict[str, Variant] = {}
    for key, value in values.items():
        signature = types.get(key) or _guess_signature(value)
        if signature == "s" and not isinstance(value, str):
            value = json.dumps(value)
        out[key] = Variant(signature, value)
    return out


def _guess_signature(value: Any) -> str:
    if isinstance(value, bool):
        return "b"
    if isinstance(value, int):
        return "x"
    if isinstance(value, float):
        return "d"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "as"
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return "a{ss}"
    return "s"
