"""Wire protocol: golden bytes, round trips, and every rejection the decoders promise.

Goldens live in tests/unit/golden/. A failing golden test means the wire format changed: if
that was intended, bump PROTOCOL_VERSION when old peers cannot read it, then regenerate with
`ORCHARD_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_protocol.py`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from runtime.chunks import Reassembler, chunk_frame
from runtime.frames import (
    FrameLimits,
    decode_task,
    decode_update,
    encode_update,
)
from runtime.protocol import (
    Hello,
    ServerState,
    SparseTensor,
    Status,
    Telemetry,
    decode_json,
    encode_json,
    validate_tensors,
)
from runtime.seal import open_sealed, seal
from tests.unit.protocol_samples import (
    FRAMES,
    JSON_SAMPLES,
    assert_same,
    check_golden,
    rejects,
    sample_artifact,
    sample_hello,
    sample_status,
    sample_task,
    sample_telemetry,
    sample_update,
    task_frame,
    update_frame,
)


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
