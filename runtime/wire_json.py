"""The strict JSON layer of the wire protocol: parsing, canonical encoding, and checking every
field of a dataclass message against its type hint and the closed sets of values.

`runtime.protocol` defines the messages and their codec on top of this; `runtime.frames` and
`runtime.seal` use it for their JSON headers. Decoding is strict because a board or a server must
never act on a half-understood message (runtime.protocol's docstring lists the rules).

Board code: standard library and runtime only, Python 3.8 compatible.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any, Union

from runtime.errors import ProtocolError
from runtime.record import field_table, is_record
from runtime.typehints import type_hints

DEVICE_STATES = ("online", "idle", "training", "uploading", "offline", "failed")
UPDATE_KINDS = ("weights", "delta")
# Why a task failed, so the server never guesses from free text: the trainer was killed under a
# memory cap or raised MemoryError (oom), killed by another signal (killed), anything else (error).
FAILURES = ("oom", "killed", "error")
UPLOAD_ENCODINGS = ("dense", "fp16")
SPLIT_OPS = ("hello", "fwd", "bwd", "epoch_end", "weights", "error")
_INT_MAX = 2**63 - 1  # every integer must fit an int64 on the other side (numpy, C)
_MAX_INT_DIGITS = 20  # "-9223372036854775808"; also keeps Python's 4300-digit ValueError away
_MAX_FREE_DEPTH = 32  # nesting allowed in free-form values (Assignment.extras); deeper breaks re-encoding

# Device ids become topic levels (no "/", "+", "#"); message ids become dict keys in chunks.
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Artifact keys and artifact file names become paths on the device: no separators, no leading dot.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=,+-]{0,127}")

_FIELD_CHOICES: dict[str, tuple[str, ...]] = {"state": DEVICE_STATES, "kind": UPDATE_KINDS, "upload": UPDATE_KINDS,
                                              "encoding": UPLOAD_ENCODINGS, "failure": FAILURES,
                                              "split_op": SPLIT_OPS}
_FIELD_PATTERNS: dict[str, re.Pattern[str]] = {
    "device_id": ID_PATTERN,
    "key": NAME_PATTERN,
    "method": ID_PATTERN,
}
_ELEMENT_PATTERNS: dict[str, re.Pattern[str]] = {"artifact_keys": NAME_PATTERN}


def show(value: object, limit: int = 60) -> str:
    """repr() capped in length, so an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def context(what: str, source: str) -> str:
    """Error-message prefix: "update frame from dev3" or just "update frame"."""
    return f"{what} from {source}" if source else what


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e400" parses to inf without this
        raise ValueError(f"non-finite number {text[:30]}")
    return value


def _parse_int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS:
        raise ValueError(f"integer with {len(text)} digits")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # json.loads would silently keep the last one
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads_strict(data: bytes | bytearray | memoryview, ctx: str) -> Any:
    """Parse UTF-8 JSON, rejecting NaN/Infinity, duplicate keys and absurd integers."""
    try:
        text = bytes(data).decode("utf-8")
        return json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_parse_float,
            parse_int=_parse_int,
            object_pairs_hook=_unique_keys,
        )
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{ctx}: JSON is not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise ProtocolError(f"{ctx}: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and the hooks above
        raise ProtocolError(f"{ctx}: bad JSON: {exc}") from None


def dumps_canonical(obj: Any, ctx: str) -> bytes:
    """Sorted keys, no whitespace, no NaN: the same message always gives the same bytes."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # unserialisable value, NaN, lone surrogate
        raise ProtocolError(f"{ctx}: not encodable as JSON: {exc}") from None


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return type_hints(cls)


# Optional fields added within protocol version 2: left out when None, so a message without them
# keeps its bytes and a peer from before them still reads it (a Jetson's GPU figures).
_OMITTED_WHEN_NONE = frozenset({"gpu_pct", "gpu_mem_mb", "gpu_energy_j"})


def _plain(value: Any, path: str, ctx: str) -> Any:
    """Records, mappings and tuples -> JSON-ready dicts and lists; numpy scalars -> Python."""
    if not isinstance(value, type) and is_record(type(value)):
        names = [n for n, _ in field_table(value) if not (n in _OMITTED_WHEN_NONE and getattr(value, n) is None)]
        return {n: _plain(getattr(value, n), f"{path}.{n}", ctx) for n in names}
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):  # json.dumps would turn 1 into "1" without a word
                raise ProtocolError(f"{ctx}: field '{path}' has non-string key {show(key)}")
        return {k: _plain(v, f"{path}[{k!r}]", ctx) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
    numpy = sys.modules.get("numpy")  # a numpy scalar exists only once numpy is imported
    if numpy is not None and isinstance(value, numpy.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(f"{ctx}: field '{path}' must be a finite number, got {value}")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion (a server re-encodes it later)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > _MAX_FREE_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _check(hint: Any, value: Any, path: str, ctx: str) -> Any:
    """Check one parsed JSON value against a field's type hint; return it in the field's type."""

    def bad(expected: str) -> ProtocolError:
        return ProtocolError(f"{ctx}: field '{path}' must be {expected}, got {show(value)}")

    if hint is Any:  # free-form (Assignment.extras): strict-parsed already, so only the depth is left
        if _depth(value) > _MAX_FREE_DEPTH:
            raise bad(f"nested at most {_MAX_FREE_DEPTH} deep")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape
            raise bad("valid Unicode text") from None
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        if not 0 <= value <= _INT_MAX:
            raise bad(f"an integer in [0, {_INT_MAX}]")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union or origin is getattr(types, "UnionType", Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(inner, value, path, ctx)
    if origin is tuple:
        if not isinstance(value, list):
            raise bad("a list")
        return tuple(_check(args[0], v, f"{path}[{i}]", ctx) for i, v in enumerate(value))
    if origin is Mapping:
        if not isinstance(value, dict):
            raise bad("an object")
        return {k: _check(args[1], v, f"{path}[{k!r}]", ctx) for k, v in value.items()}
    if isinstance(hint, type) and is_record(hint):
        return hint(**fields_from_json(hint, value, ctx, path=path))
    raise TypeError(f"protocol schema has no rule for type {hint!r}")  # a bug here, not bad input


def fields_from_json(
    cls: type, obj: Any, ctx: str, *, exclude: frozenset[str] = frozenset(), path: str = ""
) -> dict[str, Any]:
    """Validate a JSON object against dataclass `cls` (minus `exclude`); return constructor kwargs."""
    prefix = f"{path}." if path else ""
    if not isinstance(obj, dict):
        where = f"field '{path}'" if path else "message"
        raise ProtocolError(f"{ctx}: {where} must be a JSON object, got {show(obj)}")
    fields = [(n, has_default) for n, has_default in field_table(cls) if n not in exclude]
    unknown = sorted(set(obj) - {n for n, _ in fields})
    if unknown:
        raise ProtocolError(f"{ctx}: unknown field '{prefix}{unknown[0]}'")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for field_name, has_default in fields:
        name = prefix + field_name
        if field_name not in obj:
            if not has_default:
                raise ProtocolError(f"{ctx}: missing required field '{name}'")
            continue
        value = _check(hints[field_name], obj[field_name], name, ctx)
        choices = _FIELD_CHOICES.get(field_name)
        if choices is not None and value is not None and value not in choices:
            allowed = ", ".join(choices)
            raise ProtocolError(f"{ctx}: field '{name}' must be one of {allowed}, got {show(value)}")
        pattern = _FIELD_PATTERNS.get(field_name)
        if pattern is not None and not pattern.fullmatch(value):
            raise ProtocolError(f"{ctx}: field '{name}' must match {pattern.pattern}, got {show(value)}")
        element = _ELEMENT_PATTERNS.get(field_name)
        if element is not None:
            if not value:
                raise ProtocolError(f"{ctx}: field '{name}' must not be empty")
            for i, item in enumerate(value):
                if not element.fullmatch(item):
                    raise ProtocolError(f"{ctx}: field '{name}[{i}]' must match {element.pattern}, got {show(item)}")
        kwargs[field_name] = value
    return kwargs


def fields_to_json(msg: Any, ctx: str, *, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The JSON object for `msg`'s fields (minus `exclude`), validated exactly as a receiver would.

    Round-tripping through the strict parser here means a sender finds out about a NaN, a bad
    state or a float in an int field itself, instead of every receiver rejecting the message.
    """
    names = [n for n, _ in field_table(msg) if n not in exclude]
    obj = {n: _plain(getattr(msg, n), n, ctx) for n in names}
    parsed = loads_strict(dumps_canonical(obj, ctx), ctx)
    checked = fields_from_json(type(msg), parsed, ctx, exclude=exclude)
    # Re-plain the checked values so an int given for a float field is written as 4.0, not 4:
    # the bytes then depend only on the message's value, which keeps goldens stable.
    return {k: _plain(v, k, ctx) for k, v in checked.items()}
