"""Round engine: event handling, round closing, idempotency, lifecycle, and model safety."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from runtime.errors import ConfigError, RoundError
from runtime.protocol import Status, Update
from server import aggregate as agg
from server.engine import Engine, EngineConfig
from server.events import (
    Action,
    DeviceHello,
    DeviceOffline,
    DeviceStatus,
    Evaluate,
    Finish,
    Log,
    NewGlobal,
    Tick,
    UpdateReceived,
)
from server.policies import DenseModel
from server.strategies import get_strategy
from tests.unit.engine_rig import Clock, N, Rig, make_hello, sent


# ---------------------------------------------------------------- sync FedAvg
def test_sync_fedavg_waits_for_all_then_averages() -> None:
    rig = Rig(get_strategy("fedavg"))
    assert set(rig.tasks) == set(rig.ids) and all(t.base_version == 0 for t in rig.tasks.values())
    rig.at(1).update("d0", n_samples=10)
    rig.at(2).update("d1", n_samples=30)
    assert rig.globals == []
    rig.at(9).update("d2", n_samples=60)
    assert [g.version for g in rig.globals] == [1]
    expected = agg.weighted_average(rig.g0, [
        agg.UpdateContribution(None, rig.g0 + np.float32(k), float(n)) for k, n in ((1, 10), (2, 30), (3, 60))])
    np.testing.assert_allclose(rig.engine.global_flat, expected, atol=1e-6)
    # The next round went out at once, from the new version.
    assert all(t.round == 1 and t.base_version == 1 for t in rig.tasks.values())


def test_weights_kind_update_is_converted_against_its_base() -> None:
    rig = Rig(get_strategy("fedavg"), devices=2)
    for d in rig.ids:
        rig.update(d, rig.g0 + 2.0, kind="weights")
    np.testing.assert_allclose(rig.engine.global_flat, rig.g0 + 2.0, atol=1e-6)


def test_device_offline_mid_round_abandons_its_task_and_round_still_closes() -> None:
    rig = Rig(get_strategy("fedavg"))
    old_task = rig.tasks["d2"]
    rig.update("d0")
    rig.send(DeviceOffline("d2", "last will"))
    assert rig.events("task_abandoned")[0]["device"] == "d2"
    rig.update("d1")
    assert [g.device_ids for g in rig.globals] == [("d0", "d1")]
    # Its late update is refused with the reason; the model does not move.
    before = rig.engine.global_flat.copy()
    rig.update("d2", task=old_task)
    assert "abandoned" in rig.events("update_rejected")[-1]["reason"]
    np.testing.assert_array_equal(rig.engine.global_flat, before)
    # Back online: it gets work in the next round, not this one.
    rig.send(DeviceHello("d2", make_hello("d2")))
    assert rig.tasks["d2"] is old_task
    rig.update("d0")
    rig.update("d1")
    assert rig.tasks["d2"].base_version == 2


def test_failed_status_abandons_task() -> None:
    rig = Rig(get_strategy("fedavg"), devices=2)
    task = rig.tasks["d1"]
    rig.send(DeviceStatus("d1", Status("d1", "failed", 0.0, task.task_id, "trainer killed (exit 137, OOM)")))
    assert "OOM" in rig.events("task_abandoned")[0]["reason"]
    rig.update("d0")
    assert len(rig.globals) == 1


def test_fedavg_deadline_closes_with_fewer_and_drops_stragglers() -> None:
    rig = Rig(get_strategy("fedavg-deadline", deadline_s=10.0))
    assert rig.tasks["d0"].deadline_s == pytest.approx(10.0)
    late = rig.tasks["d2"]
    rig.at(3).update("d0")
    rig.at(9.9).send(Tick())
    assert rig.globals == []
    assert rig.engine.next_deadline() == pytest.approx(10.0)
    rig.at(10).send(Tick())
    assert [g.device_ids for g in rig.globals] == [("d0",)]
    assert {e["device"] for e in rig.events("task_abandoned")} == {"d1", "d2"}
    rig.at(11).update("d2", task=late)
    assert "straggler" in rig.events("update_rejected")[-1]["reason"]


# ---------------------------------------------------------------- idempotency and refusals
def test_redelivered_update_counts_once() -> None:
    rig = Rig(get_strategy("fedavg"), devices=2)
    task = rig.tasks["d0"]
    rig.update("d0")
    rig.update("d0", task=task)
    rejected = rig.events("update_rejected")
    assert len(rejected) == 1 and "duplicate" in rejected[0]["reason"] and "d0" in rejected[0]["reason"]
    assert rig.engine.n_pending == 1
    rig.update("d1")
    assert rig.globals[0].n_updates == 2


def test_unknown_device_and_unknown_task_are_refused_with_reasons() -> None:
    rig = Rig(get_strategy("fedavg"), devices=2)
    upd = Update(task_id="t999", device_id="ghost", base_version=0, n_samples=1, train_s=0.0, peak_rss_mb=0.0,
                 energy_j=None, kind="delta")
    event = UpdateReceived("ghost", upd, np.zeros(N, np.float32))
    with pytest.raises(RoundError, match=r"'ghost'.*unknown device"):
        rig.engine.check_update(event)
    rig.send(event)
    upd2 = Update(task_id="t999", device_id="d0", base_version=0, n_samples=1, train_s=0.0, peak_rss_mb=0.0,
                  energy_j=None, kind="delta")
    rig.send(UpdateReceived("d0", upd2, np.zeros(N, np.float32)))
    reasons = [e["reason"] for e in rig.events("update_rejected")]
    assert "unknown device" in reasons[0] and "unknown task" in reasons[1] and "t999" in reasons[1]
    # Another device's task is not yours.
    rig.update("d1", task=rig.tasks["d0"])
    assert "unknown task" in rig.events("update_rejected")[-1]["reason"]
    assert rig.engine.n_pending == 0 and len(rig.engine.outstanding) == 2


@pytest.mark.parametrize("bad", ["nan", "length", "int", "base", "kind"])
def test_bad_update_is_refused_and_global_unchanged(bad: str) -> None:
    rig = Rig(get_strategy("fedavg"), devices=1)
    before = rig.engine.global_flat.copy()
    task = rig.tasks["d0"]
    values = np.ones(N, np.float32)
    kind = "delta"
    if bad == "nan":
        values[3] = np.nan
    elif bad == "length":
        values = np.ones(N + 1, np.float32)
    elif bad == "int":
        values = np.ones(N, np.int32)  # type: ignore[assignment]
    elif bad == "kind":
        kind = "gradients"
    if bad == "base":
        upd = Update(task.task_id, "d0", 5, 1, 0.0, 0.0, None, kind)
        rig.send(UpdateReceived("d0", upd, values))
    else:
        rig.update("d0", values, kind=kind)
    assert len(rig.events("update_rejected")) == 1
    assert rig.globals == [] and rig.engine.version == 0
    np.testing.assert_array_equal(rig.engine.global_flat, before)
    assert not rig.engine.global_flat.flags.writeable


def test_failed_merge_keeps_the_old_global(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(get_strategy("fedavg"), devices=2)
    before = rig.engine.global_flat.copy()

    def broken(*args: Any, **kwargs: Any) -> np.ndarray:
        raise RoundError("merged model holds 3 non-finite values")

    monkeypatch.setattr(agg, "apply_deltas", broken)
    rig.update("d0")
    rig.update("d1")
    assert rig.events("aggregation_failed") and rig.globals == []
    assert rig.engine.version == 0 and rig.engine.round == 1
    np.testing.assert_array_equal(rig.engine.global_flat, before)


# ---------------------------------------------------------------- lifecycle
def test_min_devices_target_version_and_evaluate() -> None:
    clock = Clock()
    engine = Engine(get_strategy("fedavg"), DenseModel(N), np.zeros(N, np.float32), clock=clock,
                    config=EngineConfig(min_devices=2, target_version=2, eval_every=5))
    engine.handle(DeviceHello("a", make_hello("a")))
    assert sent(engine.handle(Tick())) == []
    engine.handle(DeviceHello("b", make_hello("b")))
    tasks = sent(engine.handle(Tick()))
    assert len(tasks) == 2
    out: list[Action] = []
    for _ in range(2):
        for t in tasks:
            upd = Update(t.task_id, t.device_id, t.base_version, 1, 0.0, 0.0, None, "delta")
            out = engine.handle(UpdateReceived(t.device_id, upd, np.ones(N, np.float32)))
        tasks = sent(out)
    assert [type(a) for a in out if not isinstance(a, Log)] == [NewGlobal, Evaluate, Finish]
    assert engine.finished and engine.handle(Tick()) == []


def test_time_limit_and_task_timeout() -> None:
    rig = Rig(get_strategy("fedbuff", k=5), devices=2,
              config=EngineConfig(task_timeout_s=30.0, time_limit_s=100.0))
    first = rig.tasks["d0"]
    assert rig.engine.next_deadline() == pytest.approx(30.0)
    rig.at(31).send(Tick())
    assert len(rig.events("task_abandoned")) == 2
    assert rig.tasks["d0"] is not first  # handed new work
    out = rig.at(100).send(Tick())
    assert any(isinstance(a, Finish) for a in out)


def test_status_and_offline_from_unknown_devices_are_logged() -> None:
    rig = Rig(get_strategy("fedavg"), devices=1)
    rig.send(DeviceStatus("zz", Status("zz", "idle", 0.0)))
    rig.send(DeviceOffline("zz"))
    assert [e["event"] for e in rig.logs[-2:]] == ["status_rejected", "status_rejected"]


def test_engine_config_and_initial_global_are_checked() -> None:
    with pytest.raises(ConfigError):
        EngineConfig(target_version=0)
    with pytest.raises(ConfigError, match="non-finite"):
        Engine(get_strategy(), DenseModel(2), np.array([np.nan, 0], np.float32), clock=Clock())
    with pytest.raises(ConfigError, match="3 values"):
        Engine(get_strategy(), DenseModel(2), np.zeros(3, np.float32), clock=Clock())


def test_caller_buffer_reuse_does_not_change_a_pending_update() -> None:
    rig = Rig(get_strategy("fedavg"), devices=2)
    buf = np.ones(N, np.float32)
    rig.update("d0", buf)
    buf[:] = 1e6  # a transport reusing its receive buffer
    rig.update("d1", np.ones(N, np.float32))
    np.testing.assert_allclose(rig.engine.global_flat, rig.g0 + 1.0, atol=1e-6)


def test_clients_per_round_rotates_least_recently_served() -> None:
    rig = Rig(get_strategy("fedavg", clients_per_round=2), devices=3)
    first = {t.device_id for t in rig.engine.outstanding.values()}
    assert first == {"d0", "d1"}
    rig.at(1).update("d0")
    rig.at(2).update("d1")
    assert {t.device_id for t in rig.engine.outstanding.values()} == {"d2", "d0"}


def test_sample_seed_draws_each_round_at_random_as_numpy_does() -> None:
    rig = Rig(get_strategy("fedavg", clients_per_round=3), devices=20, config=EngineConfig(sample_seed=7))
    reference = np.random.default_rng(7)
    pool = sorted(rig.ids)
    for round_index in range(4):
        expected = {pool[int(i)] for i in reference.choice(len(pool), size=3, replace=False)}
        chosen = {t.device_id for t in rig.engine.outstanding.values()}
        assert chosen == expected, round_index
        for k, d in enumerate(sorted(chosen)):
            rig.at(round_index * 10 + k + 1).update(d)
    # Not the rotation: without a seed the first round is the three lowest ids.
    plain = Rig(get_strategy("fedavg", clients_per_round=3), devices=20).engine.outstanding.values()
    assert {t.device_id for t in plain} == {"d0", "d1", "d10"}


def test_adaptive_deadline_waits_until_half_the_fleet_is_timed() -> None:
    rig = Rig(get_strategy("fedavg-deadline"), devices=4)
    assert rig.tasks["d0"].deadline_s is None  # nobody timed yet
    rig.at(1).update("d0")
    rig.at(50).send(Tick())
    assert rig.globals == []  # one of four timed: the median is still unknown
    rig.at(60).update("d1")  # lower median of {1, 60, inf, inf} = 60 -> deadline at 1.5 * 60
    assert rig.engine.next_deadline() == pytest.approx(90.0)
    rig.at(90).send(Tick())
    assert [g.n_updates for g in rig.globals] == [2]
    # The dropped stragglers enter the median with their elapsed time (a lower bound), so the
    # next deadline does not ratchet down to the fast devices.
    assert rig.engine.devices["d2"].task_s == pytest.approx(90.0)
    assert rig.tasks["d0"].deadline_s == pytest.approx(1.5 * 60.0)


def test_task_time_median_counts_untimed_devices_as_slow() -> None:
    from server.records import TaskTimeMedian

    m = TaskTimeMedian()
    for v in (None, None, 3.0):
        m.add(v)
    assert m.median() is None
    m.add(1.0)
    assert m.median() == 3.0  # lower median of {1, 3, inf, inf}
    m.remove(None)
    m.remove(None)
    assert m.median() == 1.0


def test_update_n_samples_is_capped_at_what_the_hello_declared() -> None:
    rig = Rig(get_strategy("fedavg"), devices=2)
    rig.at(1).update("d0", n_samples=2**62)
    rig.at(2).update("d1", n_samples=1000)
    accepted = {e["device"]: e for e in rig.events("update_accepted")}
    assert accepted["d0"]["n_samples"] == 1000 and accepted["d0"]["n_samples_claimed"] == 2**62
    assert "n_samples_claimed" not in accepted["d1"]
    np.testing.assert_allclose(rig.engine.global_flat, rig.g0 + 1.5)  # equal weights, deltas 1 and 2
