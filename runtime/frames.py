"""Binary frames for task, update and artifact messages: layout, encoders, validating decoders.

Frame (all integers little-endian)::

    b"ORCH" | version u8 | header_len u32 | header (UTF-8 JSON, header_len bytes) | body

The header is one canonical JSON object (sorted keys, no whitespace)::

    {"msg": "task"|"update"|"artifact"|"split", "fields": {message fields except tensors/files},
     "tensors": [{"name", "dtype", "shape", "encoding", "offset", "length"
                  (+ "nnz", "index_dtype" for sparse-coo)}, ...],
     "files": [{"name", "offset", "length"}, ...],      # artifact files; [] otherwise
     "body_len": int, "body_sha256": hex}

Body entries are packed back to back in table order (tensors, then files) with no gaps, so
"inside the body and not overlapping" reduces to "each offset equals the previous end".
Encodings: `dense` = float32; `fp16` = float16 on the wire, chosen per tensor by the sender
and widened to float32 on decode; `sparse-coo` = nnz indices (int32 when every index of the
shape fits, else int64) followed by nnz float32 values, indices strictly increasing.

Decoded arrays are *writable float32 arrays* (sparse indices: native copies in the wire's
index type, int32 or int64): the server merges
them in place. A dense float32 tensor in a writable frame buffer (what `Reassembler` hands
back) is decoded in place: the array is a view of the frame, no copy. The header is padded with
spaces (JSON whitespace) so the body starts 8-byte aligned, which makes that view aligned.
Anything else (a read-only `bytes` frame, fp16, a misaligned tensor) is copied out as before.

Integrity: the body's SHA-256 is checked, unless the frame is given as a `runtime.seal.Opened`,
whose MAC already authenticated every byte of it: each byte is hashed once on receipt.

Every decoder raises only `ProtocolError`, with one line naming the message, the sender, the
field or tensor and the value. There is no catch-all: each failure is checked explicitly, and
the fuzz tests feed random and mutated bytes to prove nothing else escapes.

Frames travel over MQTT as chunks: see `runtime.chunks`.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from typing import Any, Union

import numpy as np

from runtime.errors import ProtocolError
from runtime.frame_table import DEFAULT_LIMITS as DEFAULT_LIMITS
from runtime.frame_table import ENCODINGS as ENCODINGS
from runtime.frame_table import (
    ITEM_BYTES,
    WIRE_DTYPE,
    Entry,
    as_int,
    check_finite,
    check_keys,
    check_name,
    check_shape,
    check_sparse_indices,
    index_dtype,
    parse_file_entry,
    parse_tensor_entry,
)
from runtime.frame_table import FrameLimits as FrameLimits
from runtime.protocol import PROTOCOL_VERSION, Artifact, SparseTensor, SplitMessage, Task, Tensor, Update
from runtime.seal import Opened
from runtime.wire_json import (
    NAME_PATTERN,
    context,
    dumps_canonical,
    fields_from_json,
    fields_to_json,
    loads_strict,
    show,
)

FRAME_MAGIC = b"ORCH"
FRAME_VERSION = PROTOCOL_VERSION

_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
_HEADER_KEYS = frozenset({"msg", "fields", "tensors", "files", "body_len", "body_sha256"})
_FP16_MAX = 65504.0
_BODY_ALIGN = 8  # the body's offset in a frame is a multiple of this (header padding)
Received = Union[bytes, bytearray, memoryview, Opened]  # what the decoders take


# ---------------------------------------------------------------- encode
def encode_task(
    task: Task, *, encoding: str | Mapping[str, str] = "dense", limits: FrameLimits = DEFAULT_LIMITS
) -> bytes:
    """Task -> frame. `encoding` is "dense"/"fp16" for every dense tensor, or a per-name mapping."""
    return _encode("task", task, task.tensors, {}, encoding, limits)


def encode_update(
    update: Update, *, encoding: str | Mapping[str, str] = "dense", limits: FrameLimits = DEFAULT_LIMITS
) -> bytes:
    """Update -> frame; `encoding` as for `encode_task`. SparseTensor values always go sparse-coo."""
    return _encode("update", update, update.tensors, {}, encoding, limits)


def encode_artifact(artifact: Artifact, *, limits: FrameLimits = DEFAULT_LIMITS) -> bytes:
    """Artifact -> frame; each file is a raw byte entry of the body."""
    return _encode("artifact", artifact, {}, artifact.files, "dense", limits)


def encode_split(msg: SplitMessage, *, limits: FrameLimits = DEFAULT_LIMITS) -> bytes:
    """SplitMessage -> frame (dense float32: activations and gradients are not rounded)."""
    return _encode("split", msg, msg.tensors, {}, "dense", limits)


def _encode(
    kind: str,
    msg: Task | Update | Artifact | SplitMessage,
    tensors: Mapping[str, Tensor],
    files: Mapping[str, bytes],
    encoding: str | Mapping[str, str],
    limits: FrameLimits,
) -> bytes:
    ctx = f"encoding {kind} frame"
    header_fields = fields_to_json(msg, ctx, exclude=frozenset({"tensors", "files"}))
    if len(tensors) + len(files) > limits.max_tensors:
        raise ProtocolError(f"{ctx}: {len(tensors) + len(files)} entries exceeds the limit of {limits.max_tensors}")
    if isinstance(encoding, str):
        choice: Mapping[str, str] = {}
        default = encoding
    else:
        choice, default = encoding, "dense"
        extra = sorted(set(choice) - set(tensors))
        if extra:
            raise ProtocolError(f"{ctx}: encoding given for unknown tensor {extra[0]!r}")
    parts: list[bytes] = []
    table: list[dict[str, Any]] = []
    offset = 0
    for name, tensor in tensors.items():
        check_name(name, ctx)
        entry, data = _pack_tensor(name, tensor, choice.get(name, default), limits, ctx)
        table.append({**entry, "offset": offset, "length": len(data)})
        parts.append(data)
        offset += len(data)
    file_table: list[dict[str, Any]] = []
    for name, blob in files.items():
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise ProtocolError(f"{ctx}: file name {show(name)} must match {NAME_PATTERN.pattern}")
        if not isinstance(blob, bytes):
            raise ProtocolError(f"{ctx}: file {name!r} must be bytes, got {type(blob).__name__}")
        file_table.append({"name": name, "offset": offset, "length": len(blob)})
        parts.append(blob)
        offset += len(blob)
    body = b"".join(parts)
    header = {
        "msg": kind,
        "fields": header_fields,
        "tensors": table,
        "files": file_table,
        "body_len": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    header_bytes = dumps_canonical(header, ctx)
    header_bytes += b" " * (-(_PREFIX.size + len(header_bytes)) % _BODY_ALIGN)
    if len(header_bytes) > limits.max_header_bytes:
        raise ProtocolError(f"{ctx}: header of {len(header_bytes)} bytes exceeds {limits.max_header_bytes}")
    frame = _PREFIX.pack(FRAME_MAGIC, FRAME_VERSION, len(header_bytes)) + header_bytes + body
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError(f"{ctx}: {len(frame)} bytes exceeds the frame limit of {limits.max_frame_bytes}")
    return frame


def _pack_tensor(
    name: str, tensor: Tensor, encoding: str, limits: FrameLimits, ctx: str
) -> tuple[dict[str, Any], bytes]:
    if isinstance(tensor, SparseTensor):
        if encoding == "fp16":
            raise ProtocolError(f"{ctx}: tensor {name!r} is sparse; fp16 applies to dense tensors only")
        shape = check_shape(tensor.shape, name, limits, ctx)
        numel = math.prod(shape)
        idx, vals = np.asarray(tensor.indices), np.asarray(tensor.values)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise ProtocolError(f"{ctx}: tensor {name!r} indices must be 1-D integers, got {idx.dtype} {idx.shape}")
        if vals.ndim != 1 or vals.dtype != np.float32 or len(vals) != len(idx):
            raise ProtocolError(
                f"{ctx}: tensor {name!r} values must be 1-D float32 matching {len(idx)} indices, "
                f"got {vals.dtype} {vals.shape}"
            )
        order = np.argsort(idx, kind="stable")  # canonical: decoders require increasing indices
        idx, vals = idx[order].astype(np.int64), vals[order]
        check_sparse_indices(idx, numel, name, ctx)
        check_finite(vals, name, ctx)
        wire_index = index_dtype(numel)
        data = idx.astype("<i4" if wire_index == "int32" else "<i8").tobytes() + vals.astype("<f4").tobytes()
        entry = {
            "name": name,
            "dtype": "float32",
            "shape": list(shape),
            "encoding": "sparse-coo",
            "nnz": len(idx),
            "index_dtype": wire_index,
        }
        return entry, data
    if not isinstance(tensor, np.ndarray) or tensor.dtype != np.float32:
        got = tensor.dtype if isinstance(tensor, np.ndarray) else type(tensor).__name__
        raise ProtocolError(f"{ctx}: tensor {name!r} must be a float32 array or SparseTensor, got {got}")
    if encoding not in ("dense", "fp16"):
        raise ProtocolError(f"{ctx}: tensor {name!r}: encoding must be 'dense' or 'fp16', got {show(encoding)}")
    shape = check_shape(tensor.shape, name, limits, ctx)
    check_finite(tensor, name, ctx)
    if encoding == "fp16":
        peak = float(np.max(np.abs(tensor))) if tensor.size else 0.0
        if peak > _FP16_MAX:  # would become inf on the wire, and the receiver rejects inf
            raise ProtocolError(f"{ctx}: tensor {name!r} overflows float16 (max |value| {peak:g} > {_FP16_MAX:g})")
        data = tensor.astype("<f2").tobytes()
    else:
        data = tensor.astype("<f4", copy=False).tobytes()
    return {"name": name, "dtype": WIRE_DTYPE[encoding], "shape": list(shape), "encoding": encoding}, data


# ---------------------------------------------------------------- decode
def decode_task(frame: Received, *, source: str = "", limits: FrameLimits = DEFAULT_LIMITS) -> Task:
    fields, tensors, _ = _decode("task", Task, frame, source, limits)
    return Task(**fields, tensors=tensors)


def decode_update(frame: Received, *, source: str = "", limits: FrameLimits = DEFAULT_LIMITS) -> Update:
    fields, tensors, _ = _decode("update", Update, frame, source, limits)
    return Update(**fields, tensors=tensors)


def decode_artifact(frame: Received, *, source: str = "", limits: FrameLimits = DEFAULT_LIMITS) -> Artifact:
    fields, _, files = _decode("artifact", Artifact, frame, source, limits)
    return Artifact(**fields, files=files)


def decode_split(frame: Received, *, source: str = "", limits: FrameLimits = DEFAULT_LIMITS) -> SplitMessage:
    fields, tensors, _ = _decode("split", SplitMessage, frame, source, limits)
    return SplitMessage(**fields, tensors=tensors)


def _decode(
    kind: str, cls: type, frame: Received, source: str, limits: FrameLimits
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, bytes]]:
    ctx = context(f"{kind} frame", source)
    authenticated = isinstance(frame, Opened)  # its MAC covered every byte: no second hash
    if isinstance(frame, Opened):
        frame = frame.payload
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{ctx}: payload must be bytes, got {type(frame).__name__}")
    view = memoryview(frame).cast("B")  # slices below are views, no copies
    size = len(view)
    if size > limits.max_frame_bytes:
        raise ProtocolError(f"{ctx}: {size} bytes exceeds the frame limit of {limits.max_frame_bytes}")
    if size < _PREFIX.size:
        raise ProtocolError(f"{ctx}: truncated: {size} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, header_len = _PREFIX.unpack_from(view)
    if magic != FRAME_MAGIC:
        raise ProtocolError(f"{ctx}: bad magic {bytes(magic)!r}, expected {FRAME_MAGIC!r}")
    if version != FRAME_VERSION:
        raise ProtocolError(f"{ctx}: frame version {version}, this side speaks {FRAME_VERSION}")
    if header_len > limits.max_header_bytes:
        raise ProtocolError(f"{ctx}: header length {header_len} exceeds the limit of {limits.max_header_bytes}")
    if _PREFIX.size + header_len > size:
        raise ProtocolError(
            f"{ctx}: header length {header_len} runs past the frame ({size - _PREFIX.size} bytes after the prefix)"
        )
    header = loads_strict(view[_PREFIX.size : _PREFIX.size + header_len], f"{ctx}: header")
    body = view[_PREFIX.size + header_len :]
    if not isinstance(header, dict):
        raise ProtocolError(f"{ctx}: header must be a JSON object, got {show(header)}")
    check_keys(header, _HEADER_KEYS, "header", ctx)
    if header["msg"] != kind:
        raise ProtocolError(f"{ctx}: header says this is a {show(header['msg'])} frame, expected {kind!r}")
    body_len = as_int(header["body_len"], "body_len", ctx)
    if body_len != len(body):
        raise ProtocolError(f"{ctx}: body has {len(body)} bytes, header says body_len {body_len} (truncated?)")
    sha = header["body_sha256"]
    if not isinstance(sha, str) or len(sha) != 64:
        raise ProtocolError(f"{ctx}: body_sha256 must be 64 hex characters, got {show(sha)}")
    tables = header["tensors"], header["files"]
    if not isinstance(tables[0], list) or not isinstance(tables[1], list):
        raise ProtocolError(f"{ctx}: 'tensors' and 'files' must be lists")
    if kind == "artifact" and tables[0]:
        raise ProtocolError(f"{ctx}: artifact frames carry files, not tensors ({len(tables[0])} tensors)")
    if kind != "artifact" and tables[1]:
        raise ProtocolError(f"{ctx}: {kind} frames carry tensors, not files ({len(tables[1])} files)")
    if len(tables[0]) + len(tables[1]) > limits.max_tensors:
        raise ProtocolError(
            f"{ctx}: {len(tables[0]) + len(tables[1])} entries exceeds the limit of {limits.max_tensors}"
        )
    fields = fields_from_json(cls, header["fields"], ctx, exclude=frozenset({"tensors", "files"}))
    entries: list[Entry] = []
    offset = 0
    for i, raw in enumerate(tables[0]):
        entries.append(parse_tensor_entry(raw, i, offset, body_len, limits, ctx))
        offset += entries[-1].length
    for i, raw in enumerate(tables[1]):
        entries.append(parse_file_entry(raw, i, offset, body_len, ctx))
        offset += entries[-1].length
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ProtocolError(f"{ctx}: name {dup!r} appears twice in the table")
    if offset != body_len:
        raise ProtocolError(f"{ctx}: table covers {offset} bytes but the body has {body_len}")
    # Hash last among the cheap checks: it is the one pass over the whole body.
    actual = sha if authenticated else hashlib.sha256(body).hexdigest()
    if actual != sha:
        raise ProtocolError(f"{ctx}: body sha256 mismatch (header {sha[:12]}..., body {actual[:12]}...)")
    tensors: dict[str, Tensor] = {}
    files: dict[str, bytes] = {}
    for e in entries:
        if e.encoding == "file":
            files[e.name] = bytes(body[e.offset : e.offset + e.length])
        else:
            tensors[e.name] = _read_tensor(body, e, ctx)
    return fields, tensors, files


def _read_tensor(body: memoryview, e: Entry, ctx: str) -> Tensor:
    """One entry as a writable native-order array (a view of a writable body when it can be,
    else a copy), its values checked."""
    if e.encoding == "sparse-coo":
        index_bytes = ITEM_BYTES[e.index_dtype]
        idx = np.frombuffer(body, "<i4" if index_bytes == 4 else "<i8", count=e.nnz, offset=e.offset)
        vals = np.frombuffer(body, "<f4", count=e.nnz, offset=e.offset + e.nnz * index_bytes)
        indices, values = idx.astype(e.index_dtype), vals.astype(np.float32)  # native order, the wire's width
        check_sparse_indices(indices, math.prod(e.shape), e.name, ctx)
        check_finite(values, e.name, ctx)
        return SparseTensor(shape=e.shape, indices=indices, values=values)
    numel = math.prod(e.shape)
    wire = np.frombuffer(body, "<f2" if e.encoding == "fp16" else "<f4", count=numel, offset=e.offset)
    in_place = wire.dtype == np.float32 and wire.flags.writeable and wire.flags.aligned  # "<f4" on a little-endian host
    arr = wire.reshape(e.shape) if in_place else wire.reshape(e.shape).astype(np.float32)
    check_finite(arr, e.name, ctx)
    return arr
