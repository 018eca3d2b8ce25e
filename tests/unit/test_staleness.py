"""Staleness without starvation, and the bookkeeping of wasted work (server/waste.py).

The 10x-straggler simulation is bench/staleness_bench.py (virtual clock: its times are exact, not
host timings); `make bench` reports the same figures.
"""

from __future__ import annotations

import pytest

from bench.staleness_bench import run_case
from runtime.errors import ConfigError
from server.strategies import get_strategy
from server.waste import work_summary
from tests.unit.engine_rig import Rig


def test_straggler_simulation_default_bound_wastes_little_and_beats_fedavg_to_target() -> None:
    default = run_case("semi-async", {})
    cos2p_cap = run_case("semi-async", {"max_staleness": 10})
    fedavg = run_case("fedavg", {})
    assert default["wasted_fraction"] < 0.10
    assert default["time_to_target_s"] is not None and fedavg["time_to_target_s"] is not None
    assert default["time_to_target_s"] < fedavg["time_to_target_s"]
    # The slow devices contribute under the default bound; Co-S²P's fixed cap refuses many of
    # their updates (rounds close every ~1 s, their tasks take ~10 s): the test can tell them apart.
    assert default["slow_devices_wasted_s"] == 0 and default["slow_updates_accepted"] >= 30
    assert cos2p_cap["wasted_fraction"] > 0.10 and cos2p_cap["slow_updates_accepted"] < 25


def test_age_bound_refuses_an_update_far_older_than_the_slowest_device_and_learns() -> None:
    rig = Rig(get_strategy("semi-async", k=1, weight="samples"), devices=2)
    assert rig.engine.strategy.max_staleness is None and rig.engine.strategy.max_age_factor == 2.0
    for t in (1.0, 2.0, 3.0):  # d0 takes 1 s per task; d1 is untimed, so no bound applies yet
        rig.at(t).update("d0")
    rig.at(4.0).update("d1")  # 4 s, 3 versions stale: accepted (it may be the slow one)
    assert rig.events("update_accepted")[-1]["device"] == "d1"
    # Now both are timed (slowest 4 s → bound 8 s). d1 stalls: 9.5 s since its dispatch.
    stalled = rig.tasks["d1"]
    rig.at(5.0).update("d0")
    rig.at(13.5).update("d1", task=stalled)
    reason = rig.events("update_rejected")[-1]["reason"]
    assert "too old" in reason and "'d1'" in reason and "2 x 4 s" in reason
    # Its time was learned when refused: the next task, as slow, is accepted (never starved).
    rig.at(23.0).update("d1")
    assert rig.events("update_accepted")[-1]["device"] == "d1"


def test_max_staleness_must_be_auto_or_an_integer() -> None:
    with pytest.raises(ConfigError, match="max_staleness must be \"auto\" or an integer, got 'never'"):
        get_strategy("semi-async", max_staleness="never")
    with pytest.raises(ConfigError, match=r"age_factor=0.5 is outside \[1.0, inf\]"):
        get_strategy("semi-async", age_factor=0.5)


def test_work_summary_charges_refused_and_abandoned_tasks_until_settled() -> None:
    events = [
        {"event": "task_sent", "device": "a", "task_id": "t1", "t": 0.0},
        {"event": "device_status", "device": "a", "task_id": "t1", "state": "training", "t": 0.5},
        {"event": "task_sent", "device": "b", "task_id": "t2", "t": 0.0},
        {"event": "task_sent", "device": "c", "task_id": "t3", "t": 0.0},
        {"event": "update_accepted", "device": "a", "task_id": "t1", "t": 2.0},
        {"event": "update_rejected", "device": "b", "task_id": "t2", "t": 3.0, "reason": "too stale", "energy_j": 4.5},
        {"event": "task_abandoned", "device": "c", "task_id": "t3", "t": 4.0},  # a straggler dropped ...
        {"event": "task_sent", "device": "a", "task_id": "t4", "t": 5.0},
        {"event": "update_rejected", "device": "c", "task_id": "t3", "t": 6.5},  # ... trained on to 6.5
        {"event": "update_rejected", "device": "c", "task_id": "t3", "t": 7.0},  # a redelivery: not again
        {"event": "update_rejected", "device": "x", "reason": "unknown device"},  # no task: ignored
        {"event": "campaign_stopping", "t": 9.0},
        {"event": "update_accepted", "device": "a", "task_id": "t4", "t": 9.5},  # after the end: unfinished
    ]
    work = work_summary(events)
    assert (work.devices["a"].useful_s, work.devices["a"].unfinished_s) == (2.0, 4.0)
    assert work.devices["b"].wasted_s == 3.0 and work.devices["c"].wasted_s == 6.5
    assert work.devices["c"].tasks_wasted == 1
    assert (work.devices["b"].wasted_energy_j, work.wasted_energy_j) == (4.5, 4.5)
    assert work.wasted_s == 9.5 and work.wasted_fraction == pytest.approx(9.5 / 11.5)
    assert work_summary([]).wasted_fraction is None


def test_work_summary_leaves_offline_time_out_of_a_task() -> None:
    events = [
        {"event": "task_sent", "device": "a", "task_id": "t1", "wall_t": 10.0},
        {"event": "availability", "device": "a", "online": False, "wall_t": 12.0},  # frozen mid-task
        {"event": "device_offline", "device": "a", "wall_t": 19.0},  # its Last Will, seen later
        {"event": "task_abandoned", "device": "a", "task_id": "t1", "wall_t": 19.0},
        {"event": "availability", "device": "a", "online": True, "wall_t": 20.0},
        {"event": "device_hello", "device": "a", "wall_t": 21.0},
        {"event": "update_rejected", "device": "a", "task_id": "t1", "wall_t": 21.5},  # finished after thawing
        {"event": "task_sent", "device": "a", "task_id": "t2", "wall_t": 22.0},
        {"event": "update_accepted", "device": "a", "task_id": "t2", "wall_t": 23.0},
    ]
    work = work_summary(events, "wall_t").devices["a"]
    assert work.wasted_s == pytest.approx(2.0 + 1.5)  # 10-12 before the freeze, 20-21.5 after it
    assert work.useful_s == pytest.approx(1.0)
