"""Must show: one malicious device sending scaled updates, and a robust merge keeps the final
accuracy within 2 points of the clean run. Simulated fleet (server/memory.py) whose devices train a
real numpy softmax regression on their shard of digits, so "accuracy" is a held-out accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from models.datasets import load_dataset
from server.aggregate import FloatArray, IndexArray
from server.memory import SimDevice, simulate
from server.strategies import get_strategy

N_FEATURES, N_CLASSES = 64, 10
ROUNDS = 15


@dataclass(frozen=True, eq=False)
class SoftmaxDevice(SimDevice):
    """Full-batch gradient descent on its shard (deterministic); `scale` multiplies the delta it
    uploads: 1 is honest, -10 the attacker."""

    x: np.ndarray = field(default_factory=lambda: np.zeros((0, N_FEATURES)))
    y: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    lr: float = 0.5
    scale: float = 1.0

    def train(self, base: FloatArray, indices: IndexArray | None) -> FloatArray:
        w = base.astype(np.float64).reshape(N_FEATURES + 1, N_CLASSES)
        x1 = np.hstack([self.x, np.ones((len(self.x), 1))])
        onehot = np.eye(N_CLASSES)[self.y]
        for _ in range(self.local_steps):
            z = x1 @ w
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            w = w - self.lr * x1.T @ (p - onehot) / len(self.y)
        return (self.scale * (w.reshape(-1) - base)).astype(np.float32)


def accuracy_of(x: np.ndarray, y: np.ndarray) -> Any:
    x1 = np.hstack([x, np.ones((len(x), 1))])
    return lambda flat: float(((x1 @ flat.reshape(N_FEATURES + 1, N_CLASSES)).argmax(1) == y).mean())


@pytest.fixture(scope="module")
def fleet() -> tuple[list[SoftmaxDevice], Any]:
    train, test = load_dataset("digits", split="train", seed=0), load_dataset("digits", split="test", seed=0)
    xt, xe = train.x.reshape(len(train), -1), test.x.reshape(len(test), -1)
    shards = np.array_split(np.random.default_rng(0).permutation(len(train)), 6)
    devices = [SoftmaxDevice(f"d{i}", np.zeros(1, np.float32), n_samples=len(s), local_steps=10, x=xt[s],
                             y=train.y[s]) for i, s in enumerate(shards)]
    return devices, accuracy_of(xe, test.y)


def run(devices: list[SoftmaxDevice], metric: Any, strategy: str, **params: Any) -> float:
    init = np.zeros((N_FEATURES + 1) * N_CLASSES, dtype=np.float32)
    res = simulate(get_strategy(strategy, **params), devices, initial_global=init, until_version=ROUNDS)
    assert res.engine.version == ROUNDS
    return float(metric(res.global_flat))


def attacked(devices: list[SoftmaxDevice], scale: float) -> list[SoftmaxDevice]:
    evil = devices[0]
    # It also claims a huge sample count: capped at what its hello declared.
    return [SoftmaxDevice(evil.device_id, evil.target, n_samples=evil.n_samples, local_steps=evil.local_steps,
                          x=evil.x, y=evil.y, scale=scale), *devices[1:]]


ROBUST = [("median", {"robust_merge": "median"}), ("trimmed-mean", {"robust_merge": "trimmed-mean"}),
          ("krum", {"robust_merge": "krum", "krum_select": 3}), ("norm-reject", {"norm_bound": "reject"})]


@pytest.mark.parametrize("scale", [-10.0, 100.0])
def test_robust_merge_keeps_accuracy_within_two_points_of_the_clean_run(fleet: Any, scale: float) -> None:
    devices, metric = fleet
    clean = run(devices, metric, "fedavg")
    undefended = run(attacked(devices, scale), metric, "fedavg")
    assert clean > 0.9
    assert undefended < clean - 0.1  # the attack works without a defence (the test can fail)
    for name, params in ROBUST:
        got = run(attacked(devices, scale), metric, "fedavg", **params)
        assert abs(got - clean) <= 0.02, f"{name} under a {scale:g}x attacker: {got:.4f} vs clean {clean:.4f}"


def test_semi_async_cos2p_weights_with_norm_clip_survive_a_scaled_attacker(fleet: Any) -> None:
    devices, metric = fleet
    params = {"weight": "cos2p", "merge": "masked-delta", "k_fraction": 1.0}
    clean = run(devices, metric, "semi-async", **params)
    got = run(attacked(devices, 100.0), metric, "semi-async", norm_bound="clip", norm_factor=1.5, **params)
    assert abs(got - clean) <= 0.02, f"{got:.4f} vs clean {clean:.4f}"


def table() -> None:
    """The README's table: `python -m tests.security.test_robust_merge_sim`."""
    train, test = load_dataset("digits", split="train", seed=0), load_dataset("digits", split="test", seed=0)
    xt, xe = train.x.reshape(len(train), -1), test.x.reshape(len(test), -1)
    shards = np.array_split(np.random.default_rng(0).permutation(len(train)), 6)
    devices = [SoftmaxDevice(f"d{i}", np.zeros(1, np.float32), n_samples=len(s), local_steps=10, x=xt[s],
                             y=train.y[s]) for i, s in enumerate(shards)]
    metric = accuracy_of(xe, test.y)
    print(f"clean fleet, mean: {run(devices, metric, 'fedavg'):.4f}")
    for name, params in [("mean", {}), *ROBUST, ("norm-clip", {"norm_bound": "clip"})]:
        got = [run(attacked(devices, s), metric, "fedavg", **params) for s in (-10.0, 100.0)]
        print(f"{name:<14} -10x: {got[0]:.4f}  +100x: {got[1]:.4f}")


if __name__ == "__main__":
    table()
