"""Frame decoding: every rejection the task, update and artifact decoders promise (a truncated,
padded or forged frame, a bad header, body or tensor table) is one ProtocolError naming the field."""
from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from runtime.errors import ProtocolError
from runtime.frames import (
    FrameLimits,
    decode_artifact,
    decode_task,
    decode_update,
    encode_artifact,
    encode_task,
)
from runtime.protocol import (
    Artifact,
    SparseTensor,
    Status,
    Task,
    encode_json,
)
from tests.unit.protocol_samples import (
    FRAMES,
    artifact_frame,
    forge,
    rejects,
    sample_task,
    task_frame,
    update_frame,
)


# ---------------------------------------------------------------- frame rejections
@pytest.mark.parametrize("kind", list(FRAMES))
def test_truncation_at_every_byte_is_rejected(kind: str) -> None:
    make_frame, decode = FRAMES[kind]
    frame = make_frame()
    hlen = struct.unpack_from("<I", frame, 5)[0]
    for cut in range(len(frame)):
        with pytest.raises(ProtocolError) as info:
            decode(frame[:cut], source="dev3")
        message = str(info.value)
        assert message.startswith(f"{kind} frame from dev3: ")
        if cut < 9:
            assert "shorter than the 9-byte prefix" in message
        elif cut < 9 + hlen:
            assert "runs past the frame" in message
        else:
            assert "body has" in message


def test_trailing_bytes_are_rejected() -> None:
    rejects(decode_update, update_frame() + b"\x00", match="body has 25 bytes, header says body_len 24")


def _set(key: str, value: Any) -> Callable[[dict[str, Any], bytearray], None]:
    def edit(header: dict[str, Any], body: bytearray) -> None:
        header[key] = value

    return edit


def _tensor(i: int, key: str, value: Any) -> Callable[[dict[str, Any], bytearray], None]:
    def edit(header: dict[str, Any], body: bytearray) -> None:
        header["tensors"][i][key] = value

    return edit


def _field(key: str, value: Any) -> Callable[[dict[str, Any], bytearray], None]:
    def edit(header: dict[str, Any], body: bytearray) -> None:
        header["fields"][key] = value

    return edit


def _body_f32(offset: int, value: float) -> Callable[[dict[str, Any], bytearray], None]:
    def edit(header: dict[str, Any], body: bytearray) -> None:
        struct.pack_into("<f", body, offset, value)

    return edit


def _body_i32(offset: int, value: int) -> Callable[[dict[str, Any], bytearray], None]:
    def edit(header: dict[str, Any], body: bytearray) -> None:
        struct.pack_into("<i", body, offset, value)

    return edit


# update body: conv1.b = 2 float32 at 0..8; fc.W sparse (3, 4): int32 indices at 8..16, values at 16..24
UPDATE_EDITS = [
    (_set("msg", "task"), "header says this is a 'task' frame, expected 'update'"),
    (_set("extra", 1), "header has unknown key 'extra'"),
    (lambda h, b: h.pop("files"), "header is missing key 'files'"),
    (_set("tensors", {}), "'tensors' and 'files' must be lists"),
    (_field("bogus", 1), "unknown field 'bogus'"),
    (_field("kind", "gradient"), "field 'kind' must be one of weights, delta"),
    (_field("n_samples", -5), "field 'n_samples' must be an integer in"),
    (_field("device_id", "../etc"), "field 'device_id' must match"),
    (lambda h, b: h["fields"].pop("task_id"), "missing required field 'task_id'"),
    (_tensor(0, "dtype", "float64"), "tensor 'conv1.b' dtype 'float64' does not match encoding 'dense'"),
    (_tensor(0, "encoding", "bf16"), "tensor #0 encoding must be one of dense, fp16, sparse-coo, got 'bf16'"),
    (_tensor(0, "extra", 1), "tensor #0 has unknown key 'extra'"),
    (_tensor(0, "shape", [3]), r"tensor 'conv1.b' length 8 does not match dense float32 shape \(3,\) \(12 bytes\)"),
    (_tensor(0, "shape", [-2]), "shape must hold non-negative integers"),
    (_tensor(0, "shape", [1] * 9), "shape must be a list of at most 8 sizes"),
    (_tensor(0, "shape", [2**40]), "exceeds 268435456 elements"),
    (_tensor(0, "name", ""), "tensor name must be a string of 1-256 characters"),
    (_tensor(1, "name", "conv1.b"), "name 'conv1.b' appears twice"),
    (_tensor(0, "offset", 4), "tensor 'conv1.b' offset 4 must follow the previous entry at 0"),
    (_tensor(1, "offset", 4), "tensor 'fc.W' offset 4 must follow the previous entry at 8"),
    (_tensor(1, "length", 400), "tensor 'fc.W' spans bytes 8..408, past the 24-byte body"),
    (_tensor(1, "nnz", 20), "nnz 20 > 12 elements"),
    (_tensor(1, "index_dtype", "uint8"), "index_dtype must be 'int32' or 'int64'"),
    (_tensor(1, "offset", True), "offset must be a non-negative integer, got True"),
    (lambda h, b: b.extend(b"\x00" * 4), "table covers 24 bytes but the body has 28"),
    (_body_f32(4, float("nan")), r"tensor 'conv1.b' has NaN at flat index 1 \(1 non-finite of 2 values\)"),
    (_body_f32(0, float("inf")), "tensor 'conv1.b' has Inf at flat index 0"),
    (_body_f32(20, float("-inf")), "tensor 'fc.W' has Inf at flat index 1"),
    (_body_i32(12, 12), r"tensor 'fc.W' sparse index 12 out of range \[0, 12\)"),
    (_body_i32(8, -1), r"tensor 'fc.W' sparse index -1 out of range"),
    (_body_i32(12, 0), r"sparse indices repeat or go backwards at position 1 \(0 then 0\)"),
]


@pytest.mark.parametrize(("edit", "match"), UPDATE_EDITS)
def test_update_header_and_body_rejections(edit: Callable[[dict[str, Any], bytearray], None], match: str) -> None:
    frame = forge(update_frame(), edit)
    rejects(decode_update, frame, source="dev3", match="^update frame from dev3: .*" + match)


def test_forge_without_edits_is_the_encoder_output() -> None:
    assert forge(update_frame(), lambda h, b: None) == update_frame()


def test_prefix_rejections() -> None:
    frame = task_frame()
    rejects(decode_task, b"ORCX" + frame[4:], match=r"bad magic b'ORCX', expected b'ORCH'")
    rejects(decode_task, frame[:4] + b"\x01" + frame[5:], match="frame version 1, this side speaks 3")
    rejects(decode_task, frame[:5] + struct.pack("<I", 2**32 - 1) + frame[9:], match="header length 4294967295")
    rejects(decode_task, frame[:5] + struct.pack("<I", len(frame)) + frame[9:], match="runs past the frame")
    rejects(decode_task, "text", match="payload must be bytes")
    assert decode_task(bytearray(frame)).task_id == "r3-dev3"


def test_bad_header_json_and_sha_mismatch() -> None:
    frame = update_frame()
    hlen = struct.unpack_from("<I", frame, 5)[0]
    broken = frame[:9] + b"[" + frame[10 : 9 + hlen] + frame[9 + hlen :]
    rejects(decode_update, broken, match="header: bad JSON")
    flipped = bytearray(frame)
    flipped[-1] ^= 0x01
    rejects(decode_update, bytes(flipped), match=r"body sha256 mismatch \(header [0-9a-f]{12}\.\.\.")
    stale = forge(frame, _body_f32(0, 1.0), rehash=False)
    rejects(decode_update, stale, match="body sha256 mismatch")


def test_cross_kind_and_file_rejections() -> None:
    rejects(decode_task, update_frame(), match="header says this is a 'update' frame, expected 'task'")
    with_tensor = forge(artifact_frame(), lambda h, b: h["tensors"].append({}))
    rejects(decode_artifact, with_tensor, match="artifact frames carry files, not tensors")
    with_file = forge(update_frame(), lambda h, b: h["files"].append({}))
    rejects(decode_update, with_file, match="update frames carry tensors, not files")
    traversal = forge(artifact_frame(), lambda h, b: h["files"][0].update(name="../../etc/passwd"))
    rejects(decode_artifact, traversal, match=r"file name '\.\./\.\./etc/passwd' must match")
    rejects(decode_artifact, forge(artifact_frame(), lambda h, b: h["fields"].update(key="a/b")), match="'key'")


def test_fp16_nan_on_the_wire_is_rejected() -> None:
    frame = task_frame()
    # fc.W is the third table entry (fp16); put a float16 NaN (0x7e00) at its element 5
    edit = lambda h, b: struct.pack_into("<H", b, h["tensors"][2]["offset"] + 10, 0x7E00)  # noqa: E731
    rejects(decode_task, forge(frame, edit), match="tensor 'fc.W' has NaN at flat index 5")


def test_size_caps() -> None:
    frame = task_frame()
    rejects(decode_task, frame, limits=FrameLimits(max_frame_bytes=100), match=f"{len(frame)} bytes exceeds the")
    rejects(decode_task, frame, limits=FrameLimits(max_tensors=3), match="4 entries exceeds the limit of 3")
    rejects(decode_task, frame, limits=FrameLimits(max_header_bytes=64), match="exceeds the limit of 64")
    rejects(encode_task, sample_task(), limits=FrameLimits(max_frame_bytes=100), match="exceeds the frame limit")
    rejects(encode_task, sample_task(), limits=FrameLimits(max_tensors=2), match="4 entries exceeds")


def test_encoder_rejects_bad_tensors() -> None:
    def task_with(**tensors: Any) -> Task:
        return dataclasses.replace(sample_task(), tensors=tensors)

    bad = np.ones((2, 3), np.float32)
    bad[1, 1] = np.nan
    rejects(encode_task, task_with(w=bad), match=r"encoding task frame: tensor 'w' has NaN at flat index 4")
    rejects(encode_task, task_with(w=np.ones(3)), match="must be a float32 array or SparseTensor, got float64")
    rejects(encode_task, task_with(w=[1.0]), match="got list")
    big = np.array([1e5], np.float32)
    rejects(encode_task, task_with(w=big), encoding="fp16", match="overflows float16")
    rejects(encode_task, task_with(w=bad), encoding={"nope": "fp16"}, match="encoding given for unknown tensor")
    rejects(encode_task, task_with(w=np.ones(1, np.float32)), encoding="int8", match="'dense' or 'fp16'")
    dup = SparseTensor((4,), np.array([1, 1]), np.ones(2, np.float32))
    rejects(encode_task, task_with(s=dup), match=r"sparse indices repeat or go backwards")
    out = SparseTensor((4,), np.array([4]), np.ones(1, np.float32))
    rejects(encode_task, task_with(s=out), match=r"sparse index 4 out of range \[0, 4\)")
    mismatch = SparseTensor((4,), np.array([1, 2]), np.ones(1, np.float32))
    rejects(encode_task, task_with(s=mismatch), match="values must be 1-D float32 matching 2 indices")
    ok_sparse = SparseTensor((4,), np.array([1]), np.ones(1, np.float32))
    rejects(encode_task, task_with(s=ok_sparse), encoding={"s": "fp16"}, match="fp16 applies to dense")
    rejects(encode_task, dataclasses.replace(sample_task(), lr=float("inf")), match="field 'lr' must be a finite")
    def with_extras(extras: Any) -> Task:
        task = sample_task()
        return dataclasses.replace(task, assignment=dataclasses.replace(task.assignment, extras=extras))

    rejects(encode_task, with_extras({1: 2}), match="non-string key 1")
    rejects(encode_task, with_extras({"f": object()}), match="not encodable as JSON")
    deep: Any = 0
    for _ in range(40):
        deep = [deep]
    rejects(encode_task, with_extras({"d": deep}), match="nested at most 32 deep")
    rejects(encode_task, dataclasses.replace(sample_task(), upload="sparse"), match="field 'upload' must be one of")
    assign = sample_task().assignment
    for bad, match in ((dataclasses.replace(assign, artifact_keys=()), "field 'assignment.artifact_keys' must not"),
                       (dataclasses.replace(assign, artifact_keys=("ok", "../x")), r"artifact_keys\[1\]' must match"),
                       (dataclasses.replace(assign, method="a/b"), "field 'assignment.method' must match")):
        rejects(encode_task, dataclasses.replace(sample_task(), assignment=bad), match=match)
    rejects(encode_json, Status("dev3", "failed", 1.0, failure="gone"), match="field 'failure' must be one of")
    rejects(encode_artifact, Artifact("k", {"a/b": b""}), match="file name 'a/b' must match")
    rejects(encode_artifact, Artifact("k", {"a": "text"}), match="file 'a' must be bytes")
