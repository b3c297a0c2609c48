"""a{sv} from callers into plain Python values, and plain Python values into a{sv}.

Incoming: Variants are unwrapped recursively (dicts, arrays and structs included), so the core
sees the same shapes it would get from JSON. Outgoing (h2kd's replies, and the job specs h2kctl and
the benchmarks send): a key's D-Bus type can be given explicitly, because a Python int cannot say
whether it is a u or a t; otherwise each value gets its natural type.

Clients import this module too, so it needs nothing of h2kd but its errors.
"""

from __future__ import annotations

import json
import math
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


def json_object_from_dbus(text: str, what: str) -> dict[str, Any]:
    """A string argument that must hold a JSON object ("" is {}); anything else is InvalidArgument.

    Stricter than json.loads: NaN and Infinity are not JSON (RFC 8259), nor is a number too large for a double
    (1e400, which json.loads makes infinite, or the same written as a whole number), and h2kd gives the object
    back as JSON that Cockpit's JSON.parse and jq must read, and compares its numbers; nesting deep enough to
    exhaust the parser's recursion is refused like any other text that is not an object."""
    try:
        value = json.loads(text or "{}", parse_constant=_not_json, parse_float=_finite, parse_int=_finite_int)
    except ValueError as e:
        raise InvalidArgument(f"{what} must be a JSON object: {str(e)[:200]}") from None
    except RecursionError:
        value = None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} does not fit a double")
    return value


def _finite_int(text: str) -> int:
    if len(text.lstrip("-")) > 308:      # beyond a double's range (about 1.8e308): infinite to every reader
        raise ValueError(f"{text[:40]}... does not fit a double")
    return int(text)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def to_vardict(values: Mapping[str, Any], types: Mapping[str, str] | None = None) -> dict[str, Variant]:
    """a{sv}: a key listed in `types` gets that signature (a value that is not a str sent as s becomes
    JSON text); the others their natural type (to_variant). D-Bus has no null: a key whose value is
    None means "not given", so it is left out."""
    types = types or {}
    out: dict[str, Variant] = {}
    for key, value in values.items():
        if value is None:
            continue
        signature = types.get(key)
        if signature is None:
            out[str(key)] = to_variant(value)
        elif signature == "s" and not isinstance(value, str):
            out[str(key)] = Variant("s", json.dumps(value))
        else:
            out[str(key)] = Variant(signature, value)
    return out


def to_variant(value: Any) -> Variant:
    """A plain value as a Variant of its natural type: bool b, int u (x outside u's range), float d, str s,
    dict a{sv}, a list of str as, other lists av. A Variant is kept as it is, so that values typed by hand
    can be mixed in. TypeError for anything else (None inside a list, for one)."""
    if isinstance(value, Variant):
        return value
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("u" if 0 <= value < 2**32 else "x", value)
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, str):
        return Variant("s", value)
    if isinstance(value, dict):
        return Variant("a{sv}", to_vardict(value))
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return Variant("as", list(value))
        return Variant("av", [to_variant(v) for v in value])
    raise TypeError(f"cannot send a value of type {type(value).__name__}")
