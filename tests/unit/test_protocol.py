"""Wire protocol: golden bytes, round trips, and every rejection the decoders promise.

Goldens live in tests/unit/golden/. A failing golden test means the wire format changed: if
that was intended, bump PROTOCOL_VERSION when old peers cannot read it, then regenerate with
`ORCHARD_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_protocol.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.chunks import CHUNK_VERSION, Reassembler, chunk_frame
from runtime.errors import ProtocolError
from runtime.frame_table import index_dtype
from runtime.frames import (
    FrameLimits,
    decode_artifact,
    decode_task,
    decode_update,
    encode_artifact,
    encode_task,
    encode_update,
)
from runtime.protocol import (
    Artifact,
    Assignment,
    Hello,
    Receipt,
    ServerState,
    SparseTensor,
    Status,
    Task,
    Telemetry,
    TelemetrySample,
    Update,
    decode_json,
    encode_json,
    validate_tensors,
)
from runtime.seal import open_sealed, seal

GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("ORCHARD_UPDATE_GOLDEN") == "1"


# ---------------------------------------------------------------- samples (also used by the fuzz tests)
def sample_hello() -> Hello:
    return Hello(
        device_id="dev3",
        board="rpi4",
        cores=4.0,
        ram_mb=4096,
        runtime_version="0.1.0",
        profiles=("dense", "width=0.5"),
        n_samples=1797,
        label_histogram=(178, 182, 177, 183, 181, 182, 181, 179, 174, 180),
        artifacts=("a1b2c3d4",),
    )


def sample_status() -> Status:
    return Status(device_id="dev3", state="training", t=1700000000.25, task_id="r3-dev3", detail="")


def sample_telemetry() -> Telemetry:
    full = TelemetrySample(1700000000.0, "training", 93.5, 61.2, 143.0, 512.0, 1.2, 4.75, 120.5, temp_c=58.0)
    sparse = TelemetrySample(1700000000.5, "idle", 3.0, 61.2, 0.0, None, None, None, None)
    return Telemetry(device_id="dev3", power_source="model", samples=(full, sparse))


def sample_server_state() -> ServerState:
    return ServerState(server_id="srv0", model_id="lenet-digits", version=12, strategy="fedbuff")


def sample_receipt() -> Receipt:
    return Receipt(device_id="dev3", task_id="r3-dev3", accepted=False, reason="too stale: 3 > max_staleness 2")


def sample_task() -> Task:
    tensors = {
        "conv1.W": (np.arange(18, dtype=np.float32).reshape(2, 1, 3, 3) - 9) / 8,
        "conv1.b": np.array([0.5, -0.25], dtype=np.float32),
        "fc.W": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),  # goes fp16 below
        "fc.mask": SparseTensor((3, 4), np.array([1, 7, 11]), np.array([1.0, 2.0, -3.5], dtype=np.float32)),
    }
    return Task(
        task_id="r3-dev3",
        round=3,
        base_version=12,
        model_id="lenet-digits",
        assignment=Assignment(method="fjord", profile="p_max=0.5", artifact_keys=("a1b2c3d4", "e5f6a7b8"),
                              extras={"mu": 0.01, "channels": [0, 2], "tag": "x"}),
        local_steps=20,
        local_epochs=0,
        lr=0.05,
        batch_size=32,
        deadline_s=90.0,
        upload="delta",
        encoding="fp16",
        tensors=tensors,
        artifact_digests={"a1b2c3d4": "ab" * 32, "e5f6a7b8": "cd" * 32},
    )


TASK_ENCODING = {"fc.W": "fp16"}


def sample_update() -> Update:
    return Update(
        task_id="r3-dev3",
        device_id="dev3",
        base_version=12,
        n_samples=180,
        train_s=12.5,
        peak_rss_mb=143.0,
        energy_j=None,
        kind="delta",
        metrics={"loss": 0.75, "acc": 0.5},
        report={"steps_width_0.5": 3.0},
        tensors={
            "conv1.b": np.array([0.125, -0.0625], dtype=np.float32),
            "fc.W": SparseTensor((3, 4), np.array([0, 5]), np.array([0.25, -0.5], dtype=np.float32)),
        },
    )


def sample_artifact() -> Artifact:
    return Artifact(key="a1b2c3d4", files={"training_model.onnx": b"\x08\x07ONNX", "checkpoint": bytes(range(16))})


JSON_SAMPLES: list[Callable[[], Any]] = [sample_hello, sample_status, sample_telemetry, sample_server_state,
                                         sample_receipt]


def task_frame() -> bytes:
    return encode_task(sample_task(), encoding=TASK_ENCODING)


def update_frame() -> bytes:
    return encode_update(sample_update())


def artifact_frame() -> bytes:
    return encode_artifact(sample_artifact())


FRAMES: dict[str, tuple[Callable[[], bytes], Callable[..., Any]]] = {
    "task": (task_frame, decode_task),
    "update": (update_frame, decode_update),
    "artifact": (artifact_frame, decode_artifact),
}


def assert_same(a: Any, b: Any) -> None:
    """Dataclass equality that compares numpy arrays by value, dtype and shape."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name != "tensors":
            assert x == y, f.name
            continue
        assert list(x) == list(y)
        for name in x:
            tx, ty = x[name], y[name]
            assert type(tx) is type(ty), name
            if isinstance(tx, SparseTensor):
                assert tx.shape == ty.shape
                np.testing.assert_array_equal(tx.indices, ty.indices)
                np.testing.assert_array_equal(tx.values, ty.values)
                # decoded in the wire's index type: int32 unless an index can pass 2**31 - 1
                assert ty.indices.dtype == index_dtype(math.prod(ty.shape)) and ty.values.dtype == np.float32
            else:
                assert tx.dtype == ty.dtype == np.float32 and tx.shape == ty.shape, name
                np.testing.assert_array_equal(tx, ty)


def check_golden(name: str, data: bytes) -> None:
    path = GOLDEN / name
    if UPDATE_GOLDEN:
        GOLDEN.mkdir(exist_ok=True)
        if name.endswith(".hex"):
            text = data.hex()
            path.write_text("\n".join(text[i : i + 64] for i in range(0, len(text), 64)) + "\n")
        else:
            path.write_bytes(data + b"\n")
    stored = path.read_text()
    expected = bytes.fromhex("".join(stored.split())) if name.endswith(".hex") else stored.rstrip("\n").encode()
    assert data == expected, f"wire format of {name} changed"


def forge(frame: bytes, edit: Callable[[dict[str, Any], bytearray], None], *, rehash: bool = True) -> bytes:
    """Rebuild a frame after editing its header dict and/or body, with a consistent prefix and hash.

    Written against the documented layout, not the implementation, so it checks the layout too.
    """
    magic, version, hlen = struct.unpack_from("<4sBI", frame)
    header = json.loads(frame[9 : 9 + hlen])
    body = bytearray(frame[9 + hlen :])
    edit(header, body)
    if rehash:
        header["body_sha256"] = hashlib.sha256(body).hexdigest()
        header["body_len"] = len(body)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-(9 + len(raw)) % 8)  # padded so the body starts 8-byte aligned
    return struct.pack("<4sBI", magic, version, len(raw)) + raw + bytes(body)


def rejects(fn: Callable[..., Any], *args: Any, match: str, **kwargs: Any) -> None:
    with pytest.raises(ProtocolError, match=match):
        fn(*args, **kwargs)


# ---------------------------------------------------------------- golden bytes and round trips
@pytest.mark.parametrize("make", JSON_SAMPLES, ids=lambda f: f.__name__)
def test_json_golden_and_round_trip(make: Callable[[], Any]) -> None:
    msg = make()
    data = encode_json(msg)
    check_golden(f"{make.__name__.removeprefix('sample_')}.json", data)
    assert decode_json(type(msg), data, source="dev3") == msg


@pytest.mark.parametrize("kind", list(FRAMES))
def test_frame_golden_and_round_trip(kind: str) -> None:
    make_frame, decode = FRAMES[kind]
    frame = make_frame()
    check_golden(f"{kind}.hex", frame)
    decoded = decode(frame, source="dev3")
    original = {"task": sample_task, "update": sample_update, "artifact": sample_artifact}[kind]()
    if kind == "task":  # fc.W went as fp16: compare at fp16 precision, then exactly for the rest
        np.testing.assert_allclose(decoded.tensors["fc.W"], original.tensors["fc.W"], atol=1e-3)
        original.tensors["fc.W"] = original.tensors["fc.W"].astype(np.float16).astype(np.float32)
    assert_same(original, decoded)


def test_chunk_golden_and_reassembly() -> None:
    frame = update_frame()
    chunks = chunk_frame(frame, "r3-dev3.0", chunk_bytes=200)
    assert len(chunks) == -(-len(frame) // 200)
    check_golden("update_chunks.hex", b"".join(chunks))
    r = Reassembler(timeout_s=5, max_bytes=1 << 20, clock=lambda: 0.0)
    out = [r.feed("dev3", c) for c in [chunks[2], chunks[0], *chunks[3:], chunks[1]]]
    assert out[:-1] == [None] * (len(chunks) - 1) and out[-1] == frame
    assert r.pending_bytes == 0


def test_sealed_golden_and_open() -> None:
    """The envelope of protocol 3 (runtime/seal.py): fixed key, so the MAC is golden too."""
    frame = update_frame()
    sealed = seal(frame, key=bytes(range(32)), run_id="run7", device_id="dev3", kind="update")
    check_golden("update_sealed.hex", sealed)
    opened = open_sealed(sealed, key=bytes(range(32)), run_id="run7", device_id="dev3", kind="update")
    assert opened.payload == frame and (opened.run_id, opened.device_id, opened.kind) == ("run7", "dev3", "update")


def test_decoded_arrays_are_writable_owned_float32() -> None:
    task = decode_task(task_frame())
    for name, t in task.tensors.items():
        arr = t.values if isinstance(t, SparseTensor) else t
        assert arr.dtype == np.float32 and arr.flags.writeable and arr.flags.owndata, name
    arr = task.tensors["conv1.b"]
    assert isinstance(arr, np.ndarray)
    arr += 1  # in-place math must work (the server merges in place)


def test_sparse_is_sorted_and_int64_indices_for_huge_shapes() -> None:
    big = 2**31 + 10  # indices past int32 force the int64 index encoding
    limits = FrameLimits(max_tensor_elements=2**32)
    sparse = SparseTensor((big,), np.array([big - 1, 3]), np.array([1.0, 2.0], dtype=np.float32))
    update = dataclasses.replace(sample_update(), tensors={"x": sparse})
    frame = encode_update(update, limits=limits)
    assert b'"index_dtype":"int64"' in frame
    got = decode_update(frame, limits=limits).tensors["x"]
    assert isinstance(got, SparseTensor)
    assert got.indices.tolist() == [3, big - 1] and got.values.tolist() == [2.0, 1.0]
    assert got.indices.dtype == np.int64
    rejects(decode_update, frame, match="exceeds 268435456 elements")  # default limits


def test_empty_and_scalar_tensors_round_trip() -> None:
    tensors = {"empty": np.zeros((0, 3), np.float32), "scalar": np.array(2.5, np.float32)}
    update = dataclasses.replace(sample_update(), tensors=tensors)
    assert_same(update, decode_update(encode_update(update, encoding="fp16")))


# ---------------------------------------------------------------- JSON rejections
def status_json(**changes: Any) -> bytes:
    obj = json.loads(encode_json(sample_status()))
    obj.update(changes)
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"{not json", "bad JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b"[" * 100_000, "bad JSON|nested too deeply"),
        (status_json(msg="hello"), "field 'msg' must be 'status'"),
        (status_json(v=1), "protocol version 1"),
        (status_json(extra=1), "unknown field 'extra'"),
        (status_json(state="sleeping"), "field 'state' must be one of online, idle"),
        (status_json(t="now"), "field 't' must be a finite number, got 'now'"),
        (status_json(t=True), "field 't' must be a finite number, got True"),
        (status_json(device_id="dev/3"), "field 'device_id' must match"),
        (status_json(task_id=7), "field 'task_id' must be a string, got 7"),
        (status_json(detail="\ud800"), "valid Unicode"),
        (b'{"msg":"status","v":3,"device_id":"d","state":"idle"}', "missing required field 't'"),
        (b'{"msg":"status","v":3,"device_id":"d","state":"idle","t":NaN}', "non-finite number NaN"),
        (b'{"msg":"status","v":3,"device_id":"d","state":"idle","t":-Infinity}', "non-finite number -Infinity"),
        (b'{"msg":"status","v":3,"device_id":"d","state":"idle","t":1e400}', "non-finite number 1e400"),
        (b'{"msg":"status","v":3,"device_id":"d","state":"idle","t":1,"t":2}', "duplicate key 't'"),
        (b'{"msg":"status","v":3,"device_id":"d","state":"idle","t":' + b"9" * 5000 + b"}", "integer with 5000"),
    ],
)
def test_json_rejections(payload: bytes, match: str) -> None:
    rejects(decode_json, Status, payload, source="dev3", match="^status message from dev3: .*" + match)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("ram_mb", 4096.0, "field 'ram_mb' must be an integer, got 4096.0"),
        ("ram_mb", True, "field 'ram_mb' must be an integer"),
        ("ram_mb", -1, r"must be an integer in \[0, "),
        ("profiles", "dense", "field 'profiles' must be a list"),
        ("label_histogram", [1, "2"], r"field 'label_histogram\[1\]' must be an integer"),
    ],
)
def test_hello_field_types(field: str, value: Any, match: str) -> None:
    obj = json.loads(encode_json(sample_hello()))
    obj[field] = value
    rejects(decode_json, Hello, json.dumps(obj).encode(), match=match)


def test_nested_telemetry_sample_is_validated() -> None:
    obj = json.loads(encode_json(sample_telemetry()))
    obj["samples"][1]["state"] = "asleep"
    rejects(decode_json, Telemetry, json.dumps(obj).encode(), match=r"field 'samples\[1\]\.state' must be one of")
    obj["samples"][1] = {**obj["samples"][0], "bogus": 1}
    rejects(decode_json, Telemetry, json.dumps(obj).encode(), match=r"unknown field 'samples\[1\]\.bogus'")


def test_json_size_cap_and_defaults() -> None:
    rejects(decode_json, Status, status_json(detail="x" * 100), max_bytes=64, match="exceeds the limit of 64")
    minimal = b'{"msg":"server_state","v":3,"server_id":"s","model_id":"m","version":0,"strategy":"fedavg"}'
    assert decode_json(ServerState, minimal).online is True  # omitted defaulted field -> default


def test_encode_json_validates_before_sending() -> None:
    rejects(encode_json, Status("dev3", "asleep", 1.0), match="encoding status message: field 'state'")
    rejects(encode_json, Status("dev3", "idle", float("nan")), match="field 't' must be a finite number, got nan")
    rejects(encode_json, dataclasses.replace(sample_hello(), ram_mb=1.5), match="'ram_mb' must be an integer")
    rejects(encode_json, sample_update(), match="not a JSON message")
    # numpy scalars are fine on the way out; an int given for a float field is written as a float
    msg = dataclasses.replace(sample_hello(), cores=np.float32(2.0), ram_mb=np.int64(512))
    assert b'"cores":2.0' in encode_json(msg) and decode_json(Hello, encode_json(msg)).ram_mb == 512
    assert b'"cores":4.0' in encode_json(dataclasses.replace(sample_hello(), cores=4))


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


# ---------------------------------------------------------------- layout check
LAYOUT = {"conv1.W": (2, 1, 3, 3), "conv1.b": (2,), "fc.W": (3, 4), "fc.mask": (3, 4)}


def test_validate_tensors_accepts_matching_layout() -> None:
    validate_tensors(decode_task(task_frame()).tensors, LAYOUT)
    validate_tensors(sample_update().tensors, LAYOUT, allow_missing=True)


@pytest.mark.parametrize(
    ("tensors", "kwargs", "match"),
    [
        ({"fc9.W": np.zeros(2, np.float32)}, {"allow_missing": True}, "unknown tensor 'fc9.W'"),
        (
            {"conv1.b": np.zeros(3, np.float32)},
            {"allow_missing": True},
            r"tensor 'conv1.b' has shape \(3,\), layout expects",
        ),
        ({"conv1.b": np.zeros(2, np.float64)}, {"allow_missing": True}, "tensor 'conv1.b' has dtype float64"),
        ({"conv1.b": [0.0, 0.0]}, {"allow_missing": True}, "tensor 'conv1.b' is a list, not an array"),
        (
            {"fc.W": SparseTensor((4, 3), np.array([0]), np.ones(1, np.float32))},
            {"allow_missing": True},
            r"tensor 'fc.W' has shape \(4, 3\), layout expects \(3, 4\)",
        ),
        ({"conv1.b": np.zeros(2, np.float32)}, {}, r"missing tensor 'conv1.W' \(3 of 4 missing\)"),
    ],
)
def test_validate_tensors_rejections(tensors: dict[str, Any], kwargs: dict[str, Any], match: str) -> None:
    rejects(validate_tensors, tensors, LAYOUT, source="dev3", match="^tensors from dev3: " + match, **kwargs)


def test_validate_tensors_with_a_param_layout() -> None:
    from runtime.layout import AxisGroup, ParamLayout, ParamSpec

    layout = ParamLayout(
        params=(
            ParamSpec("conv1.b", (2,), 0, (AxisGroup("conv1"),), kind="bias"),
            ParamSpec("fc.W", (3, 4), 2, (None, None)),
        ),
        groups={"conv1": 2},
    )
    expected = {p.name: p.shape for p in layout}
    validate_tensors(sample_update().tensors, expected)
    rejects(validate_tensors, {"fc.W": np.zeros((4, 3), np.float32)}, expected, match="layout expects")


# ---------------------------------------------------------------- chunking
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_single_chunk_for_small_frames_and_exact_split() -> None:
    frame = update_frame()
    assert len(chunk_frame(frame, "m")) == 1
    assert len(chunk_frame(frame, "m", chunk_bytes=len(frame))) == 1
    assert len(chunk_frame(frame, "m", chunk_bytes=len(frame) - 1)) == 2
    r = Reassembler(timeout_s=5, max_bytes=1 << 20)
    assert r.feed("dev3", chunk_frame(frame, "m")[0]) == frame


def test_duplicate_chunks_count_once() -> None:
    frame = task_frame()
    chunks = chunk_frame(frame, "m1", chunk_bytes=100)
    r = Reassembler(timeout_s=5, max_bytes=1 << 20, clock=FakeClock())
    assert r.feed("dev3", chunks[0]) is None
    assert r.feed("dev3", chunks[0]) is None  # duplicate mid-way: ignored
    results = [r.feed("dev3", c) for c in chunks[1:]]
    assert results.count(frame) == 1
    assert all(r.feed("dev3", c) is None for c in chunks)  # QoS-1 redelivery after completion: ignored
    assert r.pending_bytes == 0 and r.expire() == []
    # The same msg id from another sender is a different message.
    assert [r.feed("dev4", c) for c in chunks][-1] == frame


def test_missing_chunk_expires_with_reason() -> None:
    clock = FakeClock()
    frame = task_frame()
    chunks = chunk_frame(frame, "m1", chunk_bytes=100)
    r = Reassembler(timeout_s=30, max_bytes=1 << 20, clock=clock)
    for c in chunks[:2] + chunks[3:]:
        assert r.feed("dev3", c) is None
    clock.now += 30
    assert r.expire() == []  # not older than the timeout yet
    clock.now += 0.5
    (reason,) = r.expire()
    assert reason == (
        f"dropped frame 'm1' from dev3: {len(chunks) - 1} of {len(chunks)} chunks after 30.5 s "
        "(timeout 30 s), missing [2]"
    )
    assert r.pending_bytes == 0
    assert r.feed("dev3", chunks[2]) is None  # the late chunk starts a fresh partial, never a bad frame


def test_completed_ids_are_forgotten_after_the_timeout() -> None:
    clock = FakeClock()
    chunk = chunk_frame(update_frame(), "m1")[0]
    r = Reassembler(timeout_s=10, max_bytes=1 << 20, clock=clock)
    assert r.feed("dev3", chunk) is not None
    assert r.feed("dev3", chunk) is None
    clock.now += 11
    r.expire()
    assert r.feed("dev3", chunk) is not None


def test_memory_is_bounded_by_evicting_the_oldest_partial() -> None:
    frame = task_frame()  # ~1 KB
    a, b = chunk_frame(frame, "a", 100), chunk_frame(frame, "b", 100)
    r = Reassembler(timeout_s=10, max_bytes=len(frame) + 10, clock=FakeClock())
    assert r.feed("dev3", a[0]) is None
    assert r.pending_bytes == len(frame)
    assert r.feed("dev4", b[0]) is None  # evicts 'a' from dev3
    assert r.pending_bytes == len(frame)
    (reason,) = r.expire()
    assert reason.startswith(f"dropped frame 'a' from dev3: evicted after 0.0 s to make room (1 of {len(a)} chunks in)")
    assert [r.feed("dev4", c) for c in b[1:]][-1] == frame
    rejects(Reassembler(10, max_bytes=100).feed, "dev3", a[0], match="exceeds the reassembly limit of 100")
    small = Reassembler(10, max_bytes=1 << 20, max_partials=1)
    small.feed("dev3", a[0])
    small.feed("dev3", b[0])
    assert len(small.expire()) == 1


def test_chunk_rejections() -> None:
    frame = update_frame()
    good = chunk_frame(frame, "m1", chunk_bytes=50)
    r = Reassembler(timeout_s=10, max_bytes=1 << 20)

    def repack(chunk: bytes, **changes: int) -> bytes:
        magic, ver, id_len, index, total, flen, crc = struct.unpack_from("<4sBBIIII", chunk)
        fields = {"index": index, "total": total, "flen": flen, "crc": crc, **changes}
        head = struct.pack("<4sBBIIII", magic, ver, id_len, *fields.values())
        return head + chunk[22:]

    rejects(r.feed, "dev3", good[0][:10], match="chunk from dev3: truncated: 10 bytes, shorter than the 22-byte")
    rejects(r.feed, "dev3", good[0][:24], match="leaves no payload after a 2-byte id")
    rejects(r.feed, "dev3", b"XCHK" + good[0][4:], match="bad magic b'XCHK'")
    rejects(r.feed, "dev3", good[0][:4] + b"\x09" + good[0][5:], match="chunk version 9")
    rejects(r.feed, "dev3", good[0][:22] + b"m/" + good[0][24:], match="msg id b'm/' must match")
    rejects(r.feed, "dev3", good[0][:-1] + bytes([good[0][-1] ^ 1]), match="crc32 mismatch")
    rejects(r.feed, "dev3", repack(good[0], index=99), match=r"index 99, total \d+, frame length \d+ are inconsistent")
    rejects(r.feed, "dev3", repack(good[0], total=0), match="are inconsistent")
    rejects(r.feed, "dev3", "str", match="payload must be bytes")
    assert r.feed("dev3", good[0]) is None
    rejects(
        r.feed,
        "dev3",
        repack(good[1], total=99),
        match=f"earlier chunks said {len(good)} / {len(frame)}; partial frame dropped",
    )
    assert r.pending_bytes == 0
    assert r.feed("dev3", good[0]) is None
    other = chunk_frame(b"x" * len(frame), "m1", chunk_bytes=50)[0]
    rejects(r.feed, "dev3", other, match="duplicate with different content")
    assert r.pending_bytes == 0
    rejects(chunk_frame, frame, "bad id", match="msg_id 'bad id' must match")
    rejects(chunk_frame, b"", "m", match="frame of 0 bytes")
    rejects(chunk_frame, frame, "m", chunk_bytes=0, match="chunk_bytes must be >= 1")


def test_chunks_that_overfill_the_announced_length_are_rejected() -> None:
    # Two chunks announcing a 3-byte frame but carrying 2 bytes each.
    def chunk(index: int, payload: bytes) -> bytes:
        import zlib

        return struct.pack("<4sBBIIII", b"OCHK", CHUNK_VERSION, 1, index, 2, 3, zlib.crc32(payload)) + b"m" + payload

    r = Reassembler(timeout_s=10, max_bytes=1 << 20)
    assert r.feed("dev3", chunk(0, b"ab")) is None
    rejects(r.feed, "dev3", chunk(1, b"cd"), match="2 payload bytes do not fit an even split of 3 bytes into 2 chunks")
    assert r.pending_bytes == 0  # the partial frame went with it
    # ... and too few bytes: chunks of 1 byte cannot cover 3 in 2, which the first chunk already shows.
    rejects(r.feed, "dev3", chunk(0, b"a"), match="1 payload bytes do not fit an even split of 3 bytes")
    assert r.pending_bytes == 0


def test_reassembler_refuses_a_frame_over_its_cap_at_the_first_chunk():
    from runtime.chunks import Reassembler, chunk_frame

    r = Reassembler(timeout_s=10, max_bytes=1 << 20, max_frame_bytes=1000)
    chunks = chunk_frame(b"x" * 5000, "big", chunk_bytes=1024)
    with pytest.raises(ProtocolError, match="5000-byte frame, over the limit of 1000"):
        r.feed("dev/a/update", chunks[0])
    assert r.pending_bytes == 0
    small = chunk_frame(b"y" * 900, "small")
    assert r.feed("dev/a/update", small[0]) == b"y" * 900
