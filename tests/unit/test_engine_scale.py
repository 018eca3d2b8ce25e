"""The engine and simulator data structures that keep a 100,000-device simulation sparse: the
idle heap against a sorted reference, and training at delivery against training at dispatch."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest

from server import engine as engine_mod
from server.engine import EngineConfig
from server.memory import Periodic, SimDevice, simulate
from server.records import IdleQueue
from server.strategies import get_strategy


class SortedIdle:
    """The reference: what the engine did before, sort every idle device by (last dispatch, id)."""

    def __init__(self) -> None:
        self._keys: dict[str, float] = {}

    def add(self, device_id: str, last_dispatch_s: float | None) -> None:
        self._keys.setdefault(device_id, -math.inf if last_dispatch_s is None else last_dispatch_s)

    def discard(self, device_id: str) -> None:
        self._keys.pop(device_id, None)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def least_recent(self, n: int) -> list[str]:
        return sorted(self._keys, key=lambda d: (self._keys[d], d))[:n]


def test_idle_queue_matches_sorted_reference_under_random_operations() -> None:
    rnd = random.Random(3)
    queue, ref = IdleQueue(), SortedIdle()
    last: dict[str, float | None] = {f"d{i}": None for i in range(60)}
    for step in range(5000):
        device_id = rnd.choice(list(last))
        op = rnd.random()
        if op < 0.45:
            queue.add(device_id, last[device_id])
            ref.add(device_id, last[device_id])
        elif op < 0.8:
            queue.discard(device_id)
            ref.discard(device_id)
        else:  # dispatch: the chosen leave, and their key moves on
            n = rnd.randint(0, 8)
            chosen = queue.least_recent(n)
            assert chosen == ref.least_recent(n), step
            for d in chosen:
                queue.discard(d)
                ref.discard(d)
                last[d] = float(step // 7)  # ties in time are broken by id
        assert len(queue) == len(ref) and set(queue) == set(ref)
        assert (device_id in queue) == (device_id in set(ref))
    assert len(queue._heap) <= 2 * len(queue) + 65  # dead entries are compacted away


def _churny_fleet(n: int, n_params: int, cls: type[SimDevice] = SimDevice) -> list[SimDevice]:
    rng = np.random.default_rng(5)
    targets = [rng.standard_normal(n_params).astype(np.float32) for _ in range(4)]
    return [cls(f"d{i:03d}", targets[i % 4], n_samples=int(rng.integers(20, 200)),
                step_s=float(0.1 * rng.lognormal(0.0, 0.5)), local_steps=5,
                availability=Periodic(on_s=3.0, off_s=2.0, phase_s=-float(rng.uniform(0, 5))))
            for i in range(n)]


def _trace(strategy: str, fleet: list[SimDevice], **params: Any) -> tuple[list[tuple[str, int]], np.ndarray, int]:
    sent: list[tuple[str, int]] = []
    result = simulate(get_strategy(strategy, **params), fleet, initial_global=np.zeros(12, dtype=np.float32),
                      until_version=15, config=EngineConfig(eval_every=0))
    for log in result.logs:
        if log["event"] == "task_sent":
            sent.append((log["device"], log["base_version"]))
    return sent, result.global_flat.copy(), result.n_events


@pytest.mark.parametrize(("strategy", "params"), [("semi-async", {"concurrency": 7, "k": 3}),
                                                  ("fedavg", {"clients_per_round": 9}),
                                                  ("fedbuff", {"k": 4, "concurrency": 6})])
def test_idle_heap_dispatches_exactly_as_the_sorted_scan(strategy: str, params: dict[str, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = _churny_fleet(40, 12)
    new = _trace(strategy, fleet, **params)
    monkeypatch.setattr(engine_mod, "IdleQueue", SortedIdle)
    old = _trace(strategy, fleet, **params)
    assert new[0] == old[0] and len(new[0]) > 40  # same devices, same order, same base versions
    assert new[2] == old[2]
    np.testing.assert_array_equal(new[1], old[1])


@dataclass(frozen=True, eq=False)
class EagerDevice(SimDevice):
    train_at_delivery: ClassVar[bool] = False
    calls: ClassVar[list[str]] = []

    def train(self, base: Any, indices: Any) -> Any:
        EagerDevice.calls.append(self.device_id)
        return super().train(base, indices)


@dataclass(frozen=True, eq=False)
class LazyDevice(SimDevice):
    calls: ClassVar[list[str]] = []

    def train(self, base: Any, indices: Any) -> Any:
        LazyDevice.calls.append(self.device_id)
        return super().train(base, indices)


def test_training_at_delivery_gives_the_same_run_as_training_at_dispatch() -> None:
    """Deferred training holds no trained copy per task in flight, and skips abandoned tasks;
    the run (versions, merged model, every decision) is bit-identical."""
    EagerDevice.calls.clear()
    LazyDevice.calls.clear()
    eager = _trace("semi-async", _churny_fleet(30, 12, EagerDevice), concurrency=10, k=4)
    lazy = _trace("semi-async", _churny_fleet(30, 12, LazyDevice), concurrency=10, k=4)
    assert lazy[0] == eager[0] and lazy[2] == eager[2]
    np.testing.assert_array_equal(lazy[1], eager[1])
    assert len(EagerDevice.calls) == len(eager[0])  # every task trained at dispatch
    assert len(LazyDevice.calls) < len(EagerDevice.calls)  # tasks lost to churn never trained



@pytest.mark.parametrize("kind", ["delta", "weights"])
@pytest.mark.parametrize("dtypes", [(np.float32, np.float32), (np.float64, np.float32), (np.float64, np.float64)])
def test_fake_training_in_place_matches_the_formula_bit_for_bit(kind: str, dtypes: tuple[Any, Any]) -> None:
    rng = np.random.default_rng(2)
    target, base = rng.standard_normal(999).astype(dtypes[0]), rng.standard_normal(999).astype(dtypes[1])
    dev = SimDevice("d", target, kind=kind, local_steps=7, step_frac=0.3)
    progress = 1.0 - (1.0 - 0.3) ** 7
    local = (base + progress * (target - base)).astype(np.float32)
    want = (local - base).astype(np.float32) if kind == "delta" else local
    got = dev.train(base, None)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    idx = np.array([5, 1, 900])
    np.testing.assert_array_equal(dev.train(base[idx], idx), want[idx])
