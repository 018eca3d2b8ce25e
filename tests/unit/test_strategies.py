"""Strategy registry, and each strategy end to end on simulated devices (in-memory transport)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import ConfigError
from server.closing import CloseAll, CloseBuffer, CloseDeadline, CloseKOrDeadline
from server.engine import EngineConfig
from server.memory import Periodic, SimDevice, Windows, simulate
from server.policies import (
    BufferMerge,
    CoS2PWeight,
    DenseMerge,
    MaskedDeltaMerge,
    MixMerge,
    PerElementMerge,
    ProfileByDevice,
    SampleWeight,
    StalenessWeight,
    TableModel,
)
from server.strategies import DEFAULT_STRATEGY, STRATEGY_NAMES, get_strategy, strategy_defaults

N = 16


def fleet(count: int, seed: int = 0) -> list[SimDevice]:
    r = np.random.default_rng(seed)
    return [SimDevice(f"d{i:04d}", r.normal(size=N).astype(np.float32), n_samples=int(r.integers(10, 200)),
                      step_s=float(r.uniform(0.05, 0.3)))
            for i in range(count)]


def weighted_target(devices: list[SimDevice]) -> np.ndarray:
    n = np.array([d.n_samples for d in devices], dtype=np.float64)
    return np.sum([d.target * k for d, k in zip(devices, n, strict=True)], axis=0) / n.sum()


G0 = np.zeros(N, np.float32)


# ---------------------------------------------------------------- registry
def test_registry_names_and_compositions() -> None:
    assert DEFAULT_STRATEGY == "semi-async"
    assert set(STRATEGY_NAMES) == {"fedavg", "fedavg-deadline", "semi-async", "fedbuff", "fedasync"}
    s = get_strategy()
    assert (type(s.close), type(s.weight), type(s.merge), s.max_staleness, s.max_age_factor) == (
        CloseKOrDeadline, CoS2PWeight, MaskedDeltaMerge, None, 2.0)
    cos2p = get_strategy("semi-async", max_staleness=10)  # Co-S²P's fixed cap, as an explicit option
    assert (cos2p.max_staleness, cos2p.max_age_factor) == (10, None)
    assert isinstance(get_strategy("fedavg").close, CloseAll)
    assert isinstance(get_strategy("fedavg").merge, DenseMerge)
    assert isinstance(get_strategy("fedavg", merge="per-element").merge, PerElementMerge)
    assert isinstance(get_strategy("fedavg-deadline", deadline_s=3).close, CloseDeadline)
    fb = get_strategy("fedbuff", k=4, concurrency=8)
    assert isinstance(fb.close, CloseBuffer) and fb.close.k == 4 and fb.concurrency == 8
    assert isinstance(fb.merge, BufferMerge) and isinstance(fb.weight, StalenessWeight)
    fa = get_strategy("fedasync", alpha=0.9)
    assert isinstance(fa.merge, MixMerge) and fa.close == CloseBuffer(k=1)
    assert isinstance(fa.weight, StalenessWeight) and fa.weight.scale == 0.9
    assert isinstance(get_strategy("semi-async", weight="samples").weight, SampleWeight)


def test_params_are_recorded_with_defaults() -> None:
    s = get_strategy("semi-async", k=3)
    assert s.params == {**strategy_defaults("semi-async"), "k": 3}


@pytest.mark.parametrize(("name", "params", "match"), [
    ("fedsgd", {}, "unknown strategy 'fedsgd'"),
    ("fedavg", {"deadline_s": 3}, "no parameter deadline_s"),
    ("semi-async", {"k": 0}, "k=0"),
    ("semi-async", {"k_fraction": 1.5}, "k_fraction=1.5"),
    ("semi-async", {"merge": "median"}, "merge='median'"),
    ("semi-async", {"weight": "oort"}, "weight='oort'"),
    ("semi-async", {"max_staleness": -1}, "max_staleness=-1"),
    ("fedavg-deadline", {"deadline_s": -2.0}, "deadline_s=-2.0"),
    ("fedbuff", {"k": 2.5}, "k must be an integer"),
    ("fedbuff", {"server_lr": "fast"}, "server_lr must be a number"),
    ("fedasync", {"alpha": 1.2}, "alpha=1.2"),
    ("fedasync", {"staleness": "sqrt"}, "staleness='sqrt'"),
])
def test_bad_names_params_and_values_are_config_errors(name: str, params: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get_strategy(name, **params)


# ---------------------------------------------------------------- end to end
def test_fedavg_converges_to_the_sample_weighted_mean() -> None:
    devices = fleet(5)
    res = simulate(get_strategy("fedavg"), devices, initial_global=G0, until_version=40,
                   metric=lambda g: float(np.abs(g - weighted_target(devices)).max()))
    assert [v.n_updates for v in res.versions] == [5] * 40
    metrics = np.array([v.metric for v in res.versions], dtype=np.float64)
    # Each round closes (1 - 0.9^10) of the gap to the weighted mean: W' - m = 0.9^10 (W - m).
    np.testing.assert_allclose(metrics[1:8] / metrics[:7], 0.9**10, rtol=1e-3)
    assert metrics[-1] < 1e-6
    # Sync: every round waits for the slowest device.
    slowest = max(d.duration_s for d in devices)
    assert res.versions[0].t == pytest.approx(slowest)


def test_fedavg_deadline_drops_stragglers() -> None:
    devices = fleet(4)
    slow = SimDevice("slow", np.ones(N, np.float32), step_s=10.0)
    res = simulate(get_strategy("fedavg-deadline", deadline_s=5.0), [*devices, slow], initial_global=G0,
                   until_version=5)
    assert all("slow" not in v.device_ids for v in res.versions)
    assert all(v.n_updates == 4 for v in res.versions)
    assert any(e["event"] == "task_abandoned" and e["device"] == "slow" for e in res.logs)


def test_semi_async_closes_at_k_and_merges_stale_updates() -> None:
    devices = [SimDevice(d.device_id, d.target, d.n_samples, step_s=0.1 * (i + 1)) for i, d in enumerate(fleet(6))]
    res = simulate(get_strategy("semi-async", deadline_s=100.0), devices, initial_global=G0, until_version=12)
    assert all(v.n_updates >= 3 for v in res.versions)  # K = ceil(0.5 * 6)
    assert all(v.t < 100.0 for v in res.versions)
    assert max(max(v.staleness) for v in res.versions) >= 1  # slow devices landed later
    assert max(max(v.staleness) for v in res.versions) <= 10


def test_semi_async_heterofl_profiles_converge_per_coordinate() -> None:
    devices = fleet(4, seed=3)
    table = {"width=0.5": np.arange(N // 2, dtype=np.int64)}
    assign = ProfileByDevice({"d0002": "width=0.5", "d0003": "width=0.5"})
    res = simulate(get_strategy("fedavg", merge="per-element"), devices, initial_global=G0, until_version=60,
                   model=TableModel(N, table), assign=assign)
    g = res.global_flat
    np.testing.assert_allclose(g[N // 2:], weighted_target(devices[:2])[N // 2:], atol=1e-3)
    np.testing.assert_allclose(g[:N // 2], weighted_target(devices)[:N // 2], atol=1e-3)


def test_fedbuff_aggregates_every_k_and_fedasync_every_update() -> None:
    devices = fleet(8)
    res = simulate(get_strategy("fedbuff", k=3, concurrency=5), devices, initial_global=G0, until_version=10)
    assert [v.n_updates for v in res.versions] == [3] * 10
    res = simulate(get_strategy("fedasync", alpha=0.5, concurrency=4), devices, initial_global=G0,
                   until_version=20, metric=lambda g: float(np.abs(g).mean()))
    assert [v.n_updates for v in res.versions] == [1] * 20
    assert res.versions[-1].metric != 0.0


def test_redelivered_updates_and_availability_churn() -> None:
    devices = [SimDevice(d.device_id, d.target, d.n_samples, step_s=d.step_s, redeliver=True,
                         availability=Periodic(on_s=3.0, off_s=1.0, phase_s=0.5 * i))
               for i, d in enumerate(fleet(6))]
    devices.append(SimDevice("late", np.ones(N, np.float32), availability=Windows(((5.0, 50.0),))))
    res = simulate(get_strategy("semi-async"), devices, initial_global=G0, until_time=40.0)
    dup = [e for e in res.logs if e["event"] == "update_rejected"]
    accepted = [e for e in res.logs if e["event"] == "update_accepted"]
    assert dup and all("duplicate" in e["reason"] for e in dup)
    assert len(dup) == len([e for e in accepted if e["device"] != "late"])  # each redelivery refused once
    assert sum(v.n_updates for v in res.versions) + res.engine.n_pending == len(accepted)
    assert any(e["event"] == "device_offline" for e in res.logs)
    assert any(e["event"] == "task_sent" and e["device"] == "late" for e in res.logs)


@pytest.mark.parametrize("name", ["semi-async", "fedbuff"])
def test_scale_1000_devices(name: str) -> None:
    devices = fleet(1000, seed=1)
    res = simulate(get_strategy(name, **({"concurrency": 200, "k": 50} if name == "fedbuff" else {})), devices,
                   initial_global=G0, until_version=8, keep_logs=False,
                   config=EngineConfig(eval_every=4))
    assert res.engine.version == 8 and len(res.versions) == 8
    assert [v for v, _ in res.evaluations] == [4, 8]
    if name == "semi-async":
        assert all(v.n_updates >= 500 for v in res.versions)
