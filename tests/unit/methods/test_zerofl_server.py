"""ZeroFL's server half: each strategy's sparse upload, through the real frame codec, is
reconstructed and merged exactly as a numpy reference (missing weights = the global value,
missing deltas = 0, then FedAvg by samples) on random inputs; bad sparse input is refused with
one line naming the value, and the global model is untouched."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from runtime.errors import ProtocolError
from runtime.frames import decode_update, encode_update
from runtime.methods import device_method, spec
from runtime.protocol import Update
from server.events import UpdateReceived
from server.methods import server_method
from server.service import update_body
from server.strategies import get_strategy
from tests.unit.methods.conftest import Opener, mlp_layout
from tests.unit.methods.server_rig import LayoutModel, Rig
from tests.unit.protocol_samples import forge

LAYOUT = mlp_layout(1.0)
DEVICES = {"a": 30, "b": 10, "c": 25}  # n_samples


def frame_for(rig: Rig, device: str, received: np.ndarray, trained: np.ndarray, n: int) -> bytes:
    task = rig.task(device)
    method = device_method(task.assignment, Opener({k: LAYOUT for k in task.assignment.artifact_keys}))
    body = method.pack(received, trained, "weights")
    upd = Update(task.task_id, device, task.base_version, n, 1.0, 10.0, None, body.form,
                 tensors=body.tensors(LAYOUT), report=body.report)
    return encode_update(upd)


def deliver(rig: Rig, device: str, frame: bytes) -> None:
    upd = decode_update(frame, source=device)
    local, values = update_body(LAYOUT, upd.tensors)
    rig.actions += rig.engine.handle(UpdateReceived(device, upd, values, local))


def reference(g0: np.ndarray, sent: dict[str, tuple[np.ndarray, np.ndarray]], upload: str) -> np.ndarray:
    """methods.md §5.3 written out: densify each client, then Σ n_i ŵ_i / Σ n_i."""
    total = sum(DEVICES.values())
    out = np.zeros(g0.size, dtype=np.float64)
    for d, (idx, values) in sent.items():
        if upload == "top-k-weights":
            full = g0.astype(np.float64).copy()
            full[idx] = values
        else:
            full = g0.astype(np.float64).copy()
            full[idx] += values
        out += DEVICES[d] * full
    return (out / total).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("upload", ["top-k-weights", "diff-top-k-weights", "top-k-diff"])
def test_reconstruct_and_merge_matches_numpy(upload: str, seed: int) -> None:
    params = spec("zerofl").params({"sparsity": 0.9, "mask_ratio": 0.1, "upload": upload})
    rig = Rig(get_strategy("fedavg"), LayoutModel(LAYOUT), dict.fromkeys(DEVICES, "dense"), method="zerofl",
              params=params)
    rng = np.random.default_rng(seed)
    sent = {}
    for d, n in DEVICES.items():
        trained = (rig.g0 + rng.normal(size=rig.g0.size)).astype(np.float32)
        frame = frame_for(rig, d, rig.g0, trained, n)
        upd = decode_update(frame)
        idx, values = update_body(LAYOUT, upd.tensors)
        assert idx is not None and idx.size < 0.25 * LAYOUT.total  # sparse on the wire
        sent[d] = (idx, values)
        deliver(rig, d, frame)
    assert rig.engine.version == 1
    np.testing.assert_allclose(rig.engine.global_flat, reference(rig.g0, sent, upload), atol=1e-5)


def test_a_form_the_strategy_does_not_send_is_refused() -> None:
    params = spec("zerofl").params({"upload": "top-k-diff"})
    rig = Rig(get_strategy("fedavg"), LayoutModel(LAYOUT), {"a": "dense"}, method="zerofl", params=params)
    task = rig.task("a")
    idx = np.arange(0, LAYOUT.total, 7, dtype=np.int64)
    upd = Update(task.task_id, "a", 0, 5, 1.0, 1.0, None, "weights")
    rig.actions += rig.engine.handle(UpdateReceived("a", upd, np.ones(idx.size, np.float32), idx))
    [rejected] = rig.logs("update_rejected")
    assert "zerofl upload 'top-k-diff' sends delta, got kind 'weights'" in rejected["reason"]
    np.testing.assert_array_equal(rig.engine.global_flat, rig.g0)


@pytest.mark.parametrize(("indices", "message"), [
    (np.array([0, 5, LAYOUT.total]), f"indices span [0, {LAYOUT.total}], outside the model's [0, {LAYOUT.total})"),
    (np.array([3, 3, 9]), "1 repeated indices"),
])
def test_bad_indices_reaching_the_engine_are_refused(indices: np.ndarray, message: str) -> None:
    params = spec("zerofl").params({"upload": "top-k-diff"})
    rig = Rig(get_strategy("fedavg"), LayoutModel(LAYOUT), {"a": "dense"}, method="zerofl", params=params)
    upd = Update(rig.task("a").task_id, "a", 0, 5, 1.0, 1.0, None, "delta")
    rig.actions += rig.engine.handle(UpdateReceived("a", upd, np.ones(indices.size, np.float32), indices))
    [rejected] = rig.logs("update_rejected")
    assert message in rejected["reason"] and "\n" not in rejected["reason"]
    np.testing.assert_array_equal(rig.engine.global_flat, rig.g0)
    assert rig.engine.version == 0


def _first_sparse(header: dict) -> dict:
    return next(t for t in header["tensors"] if t["encoding"] == "sparse-coo")


@pytest.mark.parametrize(("edit", "message"), [
    ("unsorted", "sparse indices repeat or go backwards at position 1"),
    ("duplicate", "sparse indices repeat or go backwards at position 1"),
    ("range", "out of range [0, {numel})"),
    ("nan", "has NaN at flat index"),
])
def test_bad_sparse_frames_are_refused_naming_the_value(edit: str, message: str) -> None:
    params = spec("zerofl").params({"upload": "top-k-diff"})
    rig = Rig(get_strategy("fedavg"), LayoutModel(LAYOUT), {"a": "dense"}, method="zerofl", params=params)
    trained = (rig.g0 + np.random.default_rng(3).normal(size=rig.g0.size)).astype(np.float32)
    frame = frame_for(rig, "a", rig.g0, trained, 5)
    numel = LAYOUT.params[0].size

    def change(header: dict, body: bytearray) -> None:
        t = _first_sparse(header)
        assert t["index_dtype"] == "int32"
        at = t["offset"]
        first, second = struct.unpack_from("<ii", body, at)
        if edit == "unsorted":
            struct.pack_into("<ii", body, at, second, first)
        elif edit == "duplicate":
            struct.pack_into("<ii", body, at, first, first)
        elif edit == "range":
            struct.pack_into("<i", body, at + 4 * (t["nnz"] - 1), numel)
        else:
            struct.pack_into("<f", body, at + 4 * t["nnz"], float("nan"))

    bad = forge(frame, change)
    with pytest.raises(ProtocolError) as info:
        decode_update(bad, source="a")
    text = str(info.value)
    assert message.format(numel=numel) in text and "\n" not in text
    np.testing.assert_array_equal(rig.engine.global_flat, rig.g0)  # nothing reached the model


def test_the_served_model_runs_the_devices_sparse_forward() -> None:
    method = server_method("zerofl", spec("zerofl").params({"sparsity": 0.9}), LayoutModel(LAYOUT))
    g = np.random.default_rng(4).normal(size=LAYOUT.total).astype(np.float32)
    served = method.served_weights(g, LAYOUT)
    weights = [p for p in LAYOUT if p.kind == "weight"]
    for p in LAYOUT:
        got, full = served[p.offset:p.end], g[p.offset:p.end]
        if p.kind != "weight" or p in (weights[0], weights[-1]):  # biases and the dense ends as they are
            np.testing.assert_array_equal(got, full)
            continue
        k = int(np.ceil(0.1 * p.size - 1e-9))
        top = np.sort(np.argsort(-np.abs(full))[:k])
        np.testing.assert_array_equal(np.flatnonzero(got), top)
        np.testing.assert_array_equal(got[top], full[top])
    np.testing.assert_array_equal(server_method("fedavg", {}, LayoutModel(LAYOUT)).served_weights(g, LAYOUT), g)
