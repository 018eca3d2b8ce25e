"""ZeroFL's device half: SWAT's masked forward + dense update equals a numpy reference over a
fixed batch sequence (every period), on the numpy MLP and on real ONNX Runtime artifacts; the
three sparse uploads pick the right coordinates and values; bad [method] values are refused
with one line naming the value."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.artifacts import artifacts_for, initial_weights
from models.structure import full_structure
from runtime.errors import ConfigError
from runtime.methods import device_method, spec
from runtime.methods.zerofl import Device
from runtime.ort import OrtSession
from runtime.protocol import Assignment, SparseTensor
from runtime.trainer import TrainConfig, Trainer
from tests.unit.methods.conftest import CLASSES, INPUT_SHAPE, Opener, mlp_layout
from tests.unit.mlp_reference import mlp_ce_grads

LR, BATCH = 0.2, 8


def assignment(**params: object) -> Assignment:
    return Assignment("zerofl", "dense", ("dense",), spec("zerofl").extras("dense", spec("zerofl").params(params)))


def train(opener, x, y, w0, steps: int, **params: object) -> tuple[np.ndarray, Device]:
    method = device_method(assignment(**params), opener)
    assert isinstance(method, Device)
    trainer = Trainer.on_backend(method.primary, INPUT_SHAPE, CLASSES)
    result = trainer.train(w0, x, y, TrainConfig(steps=steps, batch_size=BATCH, lr=LR, seed=3), method=method)
    return result.weights, method


def swat_reference(layout, w0, x, y, steps: int, sparsity: float, period: int, dense_ends: bool) -> np.ndarray:
    """SWAT written out: per step, per masked weight tensor keep the top ⌈(1−s)·n⌉ |w| (recomputed
    every `period` steps), forward/backward at W⊙m, W ← W − lr·∇L(W⊙m) on the dense weights."""
    w = {p.name: w0[p.offset:p.end].reshape(p.shape).astype(np.float64) for p in layout}
    weights = [p.name for p in layout if p.kind == "weight"]
    masked = weights[1:-1] if dense_ends else weights
    rng, n = np.random.default_rng(3), len(y)
    per_epoch = -(-n // BATCH)
    order = rng.permutation(n)
    masks: dict[str, np.ndarray] = {}
    for step in range(steps):
        if step % per_epoch == 0 and step > 0:
            order = rng.permutation(n)
        idx = order[(step % per_epoch) * BATCH:(step % per_epoch + 1) * BATCH]
        if step % period == 0:
            for name in masked:
                flat = np.abs(w[name]).ravel()
                k = math.ceil((1 - sparsity) * flat.size - 1e-9)
                m = np.zeros(flat.size, dtype=bool)
                m[np.argsort(-flat, kind="stable")[:k]] = True
                masks[name] = m.reshape(w[name].shape)
        s = {k: (v * masks[k] if k in masks else v) for k, v in w.items()}
        grads = mlp_ce_grads(s, x[idx], y[idx])
        for k in w:
            w[k] = w[k] - LR * grads[k]  # the dense weights, dropped ones included
    return np.concatenate([w[p.name].ravel() for p in layout]).astype(np.float32)


@pytest.fixture
def opener() -> Opener:
    return Opener({"dense": mlp_layout(1.0)})


@pytest.mark.parametrize(("sparsity", "period", "dense_ends"), [(0.9, 1, True), (0.95, 1, False), (0.9, 4, False)])
def test_masked_forward_dense_update_matches_numpy_swat(opener, data, sparsity, period, dense_ends) -> None:
    x, y = data
    layout = mlp_layout(1.0)
    w0 = np.random.default_rng(1).normal(0, 0.3, layout.total).astype(np.float32)
    got, method = train(opener, x, y, w0, 15, sparsity=sparsity, period=period, dense_ends=dense_ends)
    want = swat_reference(layout, w0, x, y, 15, sparsity, period, dense_ends)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert method.recomputes == -(-15 // period)
    again, _ = train(Opener({"dense": mlp_layout(1.0)}), x, y, w0, 15, sparsity=sparsity, period=period,
                     dense_ends=dense_ends)
    np.testing.assert_array_equal(got, again)  # deterministic


def test_masking_changes_the_result_against_dense_training(opener, data) -> None:
    x, y = data
    w0 = np.random.default_rng(1).normal(0, 0.3, mlp_layout(1.0).total).astype(np.float32)
    swat, _ = train(opener, x, y, w0, 10, sparsity=0.9, dense_ends=False)
    dense = Trainer.on_backend(Opener({"dense": mlp_layout(1.0)})("dense"), INPUT_SHAPE, CLASSES).train(
        w0, x, y, TrainConfig(steps=10, batch_size=BATCH, lr=LR, seed=3)).weights
    assert np.abs(swat - dense).max() > 1e-3  # the test above can fail: masking is not a no-op


def test_the_same_on_onnx_runtime(tmp_path, data) -> None:
    x, y = data
    art = artifacts_for("mlp", INPUT_SHAPE, CLASSES, ["dense"], optimizer="sgd", cache_dir=tmp_path)["dense"]
    session = OrtSession(art.directory)
    w0 = initial_weights(full_structure("mlp", INPUT_SHAPE, CLASSES))
    got, _ = train(lambda key: session, x, y, w0, 12, sparsity=0.9, dense_ends=False)
    want = swat_reference(session.layout, w0, x, y, 12, 0.9, 1, False)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("upload", ["top-k-weights", "diff-top-k-weights", "top-k-diff"])
def test_sparse_uploads_pick_their_coordinates(opener, upload) -> None:
    layout = mlp_layout(1.0)
    rng = np.random.default_rng(5)
    received = rng.normal(size=layout.total).astype(np.float32)
    trained = (received + rng.normal(size=layout.total) * 0.1).astype(np.float32)
    method = device_method(assignment(sparsity=0.9, mask_ratio=0.1, upload=upload), opener)
    body = method.pack(received, trained, "weights")
    assert body.form == ("weights" if upload == "top-k-weights" else "delta")
    tensors = body.tensors(layout)
    delta = trained - received
    for p in layout:
        t = tensors[p.name]
        if p.kind != "weight":
            assert isinstance(t, np.ndarray)  # biases go dense
            continue
        assert isinstance(t, SparseTensor)
        k = math.ceil(0.2 * p.size - 1e-9)  # (1 − s) + r = 0.2
        score = np.abs((delta if upload == "top-k-diff" else trained)[p.offset:p.end])
        np.testing.assert_array_equal(t.indices, np.sort(np.argsort(-score)[:k]))
        src = trained if upload == "top-k-weights" else delta
        np.testing.assert_array_equal(t.values, src[p.offset:p.end][t.indices])
    assert body.report["upload_fraction"] < 0.25


def test_total_density_rule_and_dense_upload(opener) -> None:
    layout = mlp_layout(1.0)
    received = np.zeros(layout.total, np.float32)
    trained = np.random.default_rng(2).normal(size=layout.total).astype(np.float32)
    total = device_method(assignment(sparsity=0.9, mask_ratio=0.3, density_rule="total"), opener)
    w = layout.params[0]
    sent = total.pack(received, trained, "weights").tensors(layout)[w.name]
    assert isinstance(sent, SparseTensor) and sent.indices.size == math.ceil(0.3 * w.size - 1e-9)
    dense = device_method(assignment(sparsity=0.9, upload="dense"), Opener({"dense": layout}))
    body = dense.pack(received, trained, "delta")
    assert body.indices is None and body.form == "delta"


@pytest.mark.parametrize(("params", "message"), [
    ({"sparsity": 1.0}, "sparsity 1 is outside (0, 1)"),
    ({"sparsity": 0}, "sparsity 0 is outside (0, 1)"),
    ({"sparsity": -0.5}, "sparsity -0.5 is outside (0, 1)"),
    ({"sparsity": 0.2, "mask_ratio": 0.3}, "sparsity 0.2 with mask_ratio 0.3 (extra) gives upload density 1.1"),
    ({"mask_ratio": 1.2, "density_rule": "total"}, "upload density 1.2, outside (0, 1]"),
    ({"mask_ratio": 0.0, "density_rule": "total"}, "upload density 0, outside (0, 1]"),
    ({"mask_ratio": float("nan")}, "mask_ratio must be a finite number, got nan"),
    ({"upload": "top-k"}, "upload 'top-k' is not one of"),
    ({"period": 0}, "period must be an integer >= 1, got 0"),
    ({"sparsity_x": 0.9}, "has no key 'sparsity_x'"),
])
def test_bad_method_values_name_the_value(params, message) -> None:
    with pytest.raises(ConfigError, match="zerofl") as info:
        spec("zerofl").params(params)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_only_the_dense_profile() -> None:
    assert spec("zerofl").parse_profile(" dense ", None) == "dense"
    with pytest.raises(ConfigError, match=r"only the profile 'dense', got 'width=0\.5'"):
        spec("zerofl").parse_profile("width=0.5", None)
