"""The ORT trainer against an independent numpy implementation of the same MLP and SGD."""

from __future__ import annotations

import numpy as np
import onnx

from models.artifacts import ensure_artifacts, initial_weights
from models.structure import full_structure
from runtime.trainer import TrainConfig, Trainer
from tests.unit.mlp_reference import mlp_ce_grads


def _numpy_sgd(tensors: dict[str, np.ndarray], batches: list[tuple[np.ndarray, np.ndarray]], lr: float) -> dict:
    w = {k: v.astype(np.float64).copy() for k, v in tensors.items()}
    for x, y in batches:
        grads = mlp_ce_grads(w, x, y)
        for k, g in grads.items():
            w[k] -= lr * g
    return w


def test_mlp_sgd_matches_numpy_reference(artifact_cache):
    structure = full_structure("mlp", (1, 4, 4), 5)
    art = ensure_artifacts(structure, "sgd", artifact_cache)
    ops = {n.op_type for n in onnx.load(str(art.directory / "training_model.onnx")).graph.node}
    assert "ReluGrad" not in ops and "Ceil" in ops  # the rewritten backward (models/grad_rewrite.py) is checked here
    trainer = Trainer(art.directory, threads=1)
    layout = trainer.layout
    w0 = initial_weights(structure, seed=3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 1, 4, 4)).astype(np.float32)
    y = rng.integers(0, 5, size=24).astype(np.int64)
    lr, batch, steps = 0.2, 8, 6
    result = trainer.train(w0, x, y, TrainConfig(steps=steps, batch_size=batch, lr=lr, seed=7))

    # Replay the trainer's batch order: one permutation per epoch from the same seed.
    order_rng = np.random.default_rng(7)
    batches = []
    order = order_rng.permutation(len(y))
    for step in range(steps):
        b = step % 3
        if b == 0 and step > 0:
            order = order_rng.permutation(len(y))
        idx = order[b * batch : (b + 1) * batch]
        batches.append((x[idx], y[idx]))
    expected = _numpy_sgd(layout.split(w0), batches, lr)
    got = layout.split(result.weights)
    for name in layout.names:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-4, rtol=0, err_msg=name)
    # And the weights really moved: the check cannot pass by returning w0.
    assert np.abs(result.weights - w0).max() > 1e-3


def test_eval_loss_matches_numpy(artifact_cache):
    structure = full_structure("mlp", (1, 4, 4), 5)
    trainer = Trainer(ensure_artifacts(structure, "sgd", artifact_cache).directory)
    w = initial_weights(structure, seed=1)
    t = trainer.layout.split(w)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 1, 4, 4)).astype(np.float32)
    y = rng.integers(0, 5, size=10).astype(np.int64)
    a = np.maximum(x.reshape(10, -1) @ t["fc1.W"].T + t["fc1.b"], 0)
    a = np.maximum(a @ t["fc2.W"].T + t["fc2.b"], 0)
    z = a @ t["out.W"].T + t["out.b"]
    logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    ev = trainer.evaluate(w, x, y)
    assert abs(ev.loss - float(-logp[np.arange(10), y].mean())) < 1e-4
    assert ev.accuracy == float(np.mean(z.argmax(1) == y))
