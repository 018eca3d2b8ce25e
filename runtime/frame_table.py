"""The frame table (runtime/frames.py): its limits, entry parsing and the value checks, shared by
the encoders and the validating decoders. Every failure is one `ProtocolError` line naming the
message, the sender, the field or tensor and the value.

Board code: numpy and runtime only, Python 3.8 compatible.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.errors import ProtocolError
from runtime.record import record
from runtime.wire_json import NAME_PATTERN, show

ENCODINGS = ("dense", "fp16", "sparse-coo")
_TENSOR_KEYS = frozenset({"name", "dtype", "shape", "encoding", "offset", "length"})
_SPARSE_KEYS = _TENSOR_KEYS | {"nnz", "index_dtype"}
_FILE_KEYS = frozenset({"name", "offset", "length"})
WIRE_DTYPE = {"dense": "float32", "fp16": "float16", "sparse-coo": "float32"}
ITEM_BYTES = {"float32": 4, "float16": 2, "int32": 4, "int64": 8}


def index_dtype(numel: int) -> str:
    """The narrowest index type that holds every index of a buffer of `numel` values: "int32" up
    to 2**31 values (the last index, numel - 1, fits), else "int64". Sparse frames carry indices
    in it, and the server keeps merge indices in it (half the bytes, ~20 % faster scatters)."""
    return "int32" if numel <= 2**31 else "int64"


_MAX_NAME_CHARS = 256


@record
class FrameLimits:
    """Caps a receiver enforces before allocating anything; senders check the same ones."""

    max_frame_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 1024 * 1024
    max_tensors: int = 4096  # table entries: tensors plus artifact files
    max_ndim: int = 8
    max_tensor_elements: int = 1 << 28  # dense size a shape may claim (sparse shapes included)


DEFAULT_LIMITS = FrameLimits()


@record
class Entry:
    name: str
    encoding: str  # one of ENCODINGS, or "file"
    shape: tuple[int, ...]
    offset: int
    length: int
    nnz: int = 0
    index_dtype: str = ""


def parse_tensor_entry(raw: Any, i: int, offset: int, body_len: int, limits: FrameLimits, ctx: str) -> Entry:
    where = f"tensor #{i}"
    if not isinstance(raw, dict):
        raise ProtocolError(f"{ctx}: {where} must be a JSON object, got {show(raw)}")
    encoding = raw.get("encoding")
    if encoding not in ENCODINGS:
        raise ProtocolError(f"{ctx}: {where} encoding must be one of {', '.join(ENCODINGS)}, got {show(encoding)}")
    check_keys(raw, _SPARSE_KEYS if encoding == "sparse-coo" else _TENSOR_KEYS, where, ctx)
    name = raw["name"]
    check_name(name, ctx)
    where = f"tensor {name!r}"
    shape = check_shape(raw["shape"], name, limits, ctx)
    if raw["dtype"] != WIRE_DTYPE[encoding]:
        raise ProtocolError(
            f"{ctx}: {where} dtype {show(raw['dtype'])} does not match encoding {encoding!r} "
            f"(expected {WIRE_DTYPE[encoding]!r})"
        )
    numel = math.prod(shape)
    nnz, index_dtype = 0, ""
    if encoding == "sparse-coo":
        nnz = as_int(raw["nnz"], f"{where} nnz", ctx)
        index_dtype = raw["index_dtype"]
        if index_dtype not in ("int32", "int64"):
            raise ProtocolError(f"{ctx}: {where} index_dtype must be 'int32' or 'int64', got {show(index_dtype)}")
        if nnz > numel:
            raise ProtocolError(f"{ctx}: {where} has nnz {nnz} > {numel} elements of shape {shape}")
        want = nnz * (ITEM_BYTES[index_dtype] + 4)
    else:
        want = numel * ITEM_BYTES[WIRE_DTYPE[encoding]]
    entry_offset = as_int(raw["offset"], f"{where} offset", ctx)
    length = as_int(raw["length"], f"{where} length", ctx)
    check_span(where, entry_offset, length, offset, body_len, ctx)
    if length != want:
        raise ProtocolError(
            f"{ctx}: {where} length {length} does not match {encoding} {WIRE_DTYPE[encoding]} "
            f"shape {shape}{f' nnz {nnz}' if nnz else ''} ({want} bytes)"
        )
    return Entry(name, encoding, shape, entry_offset, length, nnz, index_dtype)


def parse_file_entry(raw: Any, i: int, offset: int, body_len: int, ctx: str) -> Entry:
    if not isinstance(raw, dict):
        raise ProtocolError(f"{ctx}: file #{i} must be a JSON object, got {show(raw)}")
    check_keys(raw, _FILE_KEYS, f"file #{i}", ctx)
    name = raw["name"]
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ProtocolError(f"{ctx}: file name {show(name)} must match {NAME_PATTERN.pattern}")
    entry_offset = as_int(raw["offset"], f"file {name!r} offset", ctx)
    length = as_int(raw["length"], f"file {name!r} length", ctx)
    check_span(f"file {name!r}", entry_offset, length, offset, body_len, ctx)
    return Entry(name, "file", (length,), entry_offset, length)


def as_int(value: Any, what: str, ctx: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"{ctx}: {what} must be a non-negative integer, got {show(value)}")
    return value


def check_keys(obj: dict[str, Any], allowed: frozenset[str], where: str, ctx: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ProtocolError(f"{ctx}: {where} has unknown key {unknown[0]!r}")
    missing = sorted(allowed - set(obj))
    if missing:
        raise ProtocolError(f"{ctx}: {where} is missing key {missing[0]!r}")


def check_name(name: Any, ctx: str) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME_CHARS:
        raise ProtocolError(f"{ctx}: tensor name must be a string of 1-{_MAX_NAME_CHARS} characters, got {show(name)}")


def check_shape(shape: Any, name: str, limits: FrameLimits, ctx: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) > limits.max_ndim:
        raise ProtocolError(
            f"{ctx}: tensor {name!r} shape must be a list of at most {limits.max_ndim} sizes, got {show(shape)}"
        )
    dims = [int(d) if isinstance(d, np.integer) else d for d in shape]  # numpy shapes may hold np.int64
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims):
        raise ProtocolError(f"{ctx}: tensor {name!r} shape must hold non-negative integers, got {show(shape)}")
    if math.prod(dims) > limits.max_tensor_elements:
        raise ProtocolError(f"{ctx}: tensor {name!r} shape {tuple(dims)} exceeds {limits.max_tensor_elements} elements")
    return tuple(dims)


def check_span(where: str, offset: int, length: int, expected: int, body_len: int, ctx: str) -> None:
    if offset != expected:
        raise ProtocolError(f"{ctx}: {where} offset {offset} must follow the previous entry at {expected}")
    if offset + length > body_len:
        raise ProtocolError(f"{ctx}: {where} spans bytes {offset}..{offset + length}, past the {body_len}-byte body")


def check_finite(arr: npt.NDArray[np.float32], name: str, ctx: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        flat = bad.reshape(-1)
        first = int(np.argmax(flat))
        kind = "NaN" if np.isnan(arr.reshape(-1)[first]) else "Inf"
        raise ProtocolError(
            f"{ctx}: tensor {name!r} has {kind} at flat index {first} "
            f"({int(flat.sum())} non-finite of {arr.size} values)"
        )


def check_sparse_indices(idx: npt.NDArray[np.int64], numel: int, name: str, ctx: str) -> None:
    if idx.size == 0:
        return
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= numel:
        value = low if low < 0 else high
        raise ProtocolError(f"{ctx}: tensor {name!r} sparse index {value} out of range [0, {numel})")
    steps = np.diff(idx)
    if steps.size and (steps <= 0).any():
        at = int(np.argmax(steps <= 0))
        raise ProtocolError(
            f"{ctx}: tensor {name!r} sparse indices repeat or go backwards at position {at + 1} "
            f"({int(idx[at])} then {int(idx[at + 1])})"
        )
