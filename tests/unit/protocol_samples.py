"""Sample messages and frames of the wire protocol, and the helpers that forge and check them
(shared by the protocol, frame-rejection, chunking and fuzz tests)."""
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

from runtime.errors import ProtocolError
from runtime.frame_table import index_dtype
from runtime.frames import (
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
)

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
