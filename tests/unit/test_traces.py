"""Availability and CPU traces: seeded determinism, Markov statistics, trace files and their
rejections, and the driver on a virtual clock."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.errors import ConfigError
from testbed.traces import (
    AlwaysOnline,
    ConstantCpu,
    MarkovAvailability,
    RandomWalkCpu,
    TraceDriver,
    make_availability,
    make_cpu_trace,
)

MARKOV = {"kind": "markov", "mean_on_s": 30, "mean_off_s": 10}
WALK = {"kind": "random_walk", "step_s": 5, "sigma": 0.2, "min": 0.25, "max": 1.0}


def avail(spec: dict[str, Any], tmp_path: Path | None = None, **kw: Any) -> Any:
    return make_availability(spec, seed=kw.pop("seed", 7), base_dir=tmp_path or ".", **kw)


def cpu(spec: dict[str, Any], tmp_path: Path | None = None, **kw: Any) -> Any:
    return make_cpu_trace(spec, seed=kw.pop("seed", 7), base_dir=tmp_path or ".", **kw)


# ------------------------------------------------------------------------------ basic kinds
def test_always_online() -> None:
    t = avail({"kind": "always"})
    assert isinstance(t, AlwaysOnline)
    assert t.online_at(0) and t.online_at(1e9)
    assert t.changes(1000) == [(0.0, True)]
    assert t.changes(1000, since_s=0.0) == []


def test_constant_cpu_and_range() -> None:
    t = cpu({"kind": "constant", "value": 0.5})
    assert t.value_at(123.0) == 0.5 and t.changes(50) == [(0.0, 0.5)]
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ConfigError, match="value"):
            cpu({"kind": "constant", "value": bad})
    with pytest.raises(ConfigError):
        ConstantCpu(0.0)


# ------------------------------------------------------------------------------- markov
def test_markov_is_determined_by_seed_and_not_by_query_order() -> None:
    a, b = avail(MARKOV, seed=3), avail(MARKOV, seed=3)
    b.online_at(5000.0)  # b draws far ahead first; a draws step by step
    for t in np.linspace(0, 5000, 301):
        a.online_at(float(t))
    assert a.changes(5000) == b.changes(5000)
    assert avail(MARKOV, seed=4).changes(5000) != a.changes(5000)
    spec_salted = avail({**MARKOV, "seed": 1}, seed=3)
    assert spec_salted.changes(5000) != a.changes(5000)


def test_markov_changes_alternate_and_agree_with_online_at() -> None:
    t = avail(MARKOV, seed=11)
    ch = t.changes(2000)
    assert ch[0][0] == 0.0
    assert all(x[1] != y[1] for x, y in itertools.pairwise(ch))
    assert all(x[0] < y[0] for x, y in itertools.pairwise(ch))
    for (t0, state), (t1, _) in itertools.pairwise(ch):
        assert t.online_at(t0) == state and t.online_at((t0 + t1) / 2) == state
        assert t.online_at(t1) != state


def test_markov_windows_concatenate_to_the_whole() -> None:
    t = avail(MARKOV, seed=5)
    edges = [-math.inf, 0.0, 17.5, 100.0, 100.0, 333.3, 1000.0]
    pieces = [c for lo, hi in itertools.pairwise(edges) for c in t.changes(hi, since_s=lo)]
    assert pieces == t.changes(1000.0)


def test_markov_mean_dwell_times_match_the_config() -> None:
    t = MarkovAvailability(mean_on_s=30.0, mean_off_s=10.0, seed=2024, start="on")
    ch = t.changes(400_000.0)  # about 10 000 on/off cycles
    dwell: dict[bool, list[float]] = {True: [], False: []}
    for (t0, state), (t1, _) in itertools.pairwise(ch):
        dwell[state].append(t1 - t0)
    assert len(dwell[True]) > 8000
    assert np.mean(dwell[True]) == pytest.approx(30.0, rel=0.04)
    assert np.mean(dwell[False]) == pytest.approx(10.0, rel=0.04)
    # Exponential: the standard deviation equals the mean.
    assert np.std(dwell[True]) == pytest.approx(30.0, rel=0.08)


def test_markov_start_states() -> None:
    assert avail({**MARKOV, "start": "on"}).online_at(0)
    assert not avail({**MARKOV, "start": "off"}).online_at(0)
    starts = [avail(MARKOV, seed=s).online_at(0) for s in range(400)]
    assert np.mean(starts) == pytest.approx(0.75, abs=0.07)  # stationary: 30 / (30 + 10)


def test_markov_rejects_bad_specs() -> None:
    with pytest.raises(ConfigError, match=r"c\.toml: unknown key 'mean_of_s' in \[fleet\.a\.availability\]"):
        make_availability({"kind": "markov", "mean_on_s": 1, "mean_of_s": 1}, seed=0, base_dir=".",
                          source="c.toml", table="fleet.a.availability")
    with pytest.raises(ConfigError, match="mean_off_s"):
        avail({"kind": "markov", "mean_on_s": 1, "mean_off_s": 0})
    with pytest.raises(ConfigError, match="missing key 'mean_on_s'"):
        avail({"kind": "markov", "mean_off_s": 1})
    with pytest.raises(ConfigError, match="kind must be one of"):
        avail({"kind": "weibull"})
    with pytest.raises(ConfigError, match="missing key 'kind'"):
        avail({})
    with pytest.raises(ConfigError, match="seed"):
        make_availability(MARKOV, seed=-1, base_dir=".")


def test_availability_and_cpu_streams_differ_for_one_seed() -> None:
    a = avail({"kind": "markov", "mean_on_s": 5, "mean_off_s": 5}, seed=9)
    c = cpu(WALK, seed=9)
    assert isinstance(c, RandomWalkCpu) and isinstance(a, MarkovAvailability)
    assert c.seed != a.seed


# --------------------------------------------------------------------------- random walk
def test_random_walk_is_seeded_bounded_and_on_its_grid() -> None:
    a, b = cpu(WALK, seed=1), cpu(WALK, seed=1)
    b.value_at(10_000.0)
    ch = a.changes(10_000.0)
    assert ch == b.changes(10_000.0)
    assert ch != cpu(WALK, seed=2).changes(10_000.0)
    assert ch[0] == (0.0, 1.0)  # starts at max by default
    assert all(0.25 <= v <= 1.0 for _, v in ch)
    assert all(t % 5 == 0 for t, _ in ch)
    assert any(v == 0.25 for _, v in ch) and len(ch) > 100  # clipped at min, moves otherwise
    assert all(x[1] != y[1] for x, y in itertools.pairwise(ch))
    assert a.value_at(7.0) == a.value_at(5.0)
    assert cpu({**WALK, "start": 0.5}).value_at(0.0) == 0.5


def test_random_walk_rejects_bad_bounds() -> None:
    with pytest.raises(ConfigError, match=r"min 0\.9 is above max 0\.5"):
        cpu({**WALK, "min": 0.9, "max": 0.5})
    with pytest.raises(ConfigError, match="step_s"):
        cpu({**WALK, "step_s": 0})
    with pytest.raises(ConfigError, match="start"):
        cpu({**WALK, "start": 0.1})
    with pytest.raises(ConfigError, match="unknown key 'mean_on_s'"):
        cpu({**WALK, "mean_on_s": 3})


# ------------------------------------------------------------------------ availability files
def write(tmp_path: Path, name: str, content: Any) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_json_active_intervals(tmp_path: Path) -> None:
    write(tmp_path, "a.json", {"active": [[0, 10], [10, 20], [30, 40]]})
    t = avail({"kind": "file", "path": "a.json"}, tmp_path)
    assert t.changes(100) == [(0.0, True), (20.0, False), (30.0, True), (40.0, False)]  # [0,10)+[10,20) merge
    assert t.online_at(39.9) and not t.online_at(40.0) and not t.online_at(1e6)


def test_json_inactive_only_means_online_outside(tmp_path: Path) -> None:
    write(tmp_path, "i.json", {"inactive": [[5, 8]]})
    t = avail({"kind": "file", "path": "i.json"}, tmp_path)
    assert t.changes(100) == [(0.0, True), (5.0, False), (8.0, True)]


def test_fedscale_native_shape_repeats_with_finish_time(tmp_path: Path) -> None:
    write(tmp_path, "fs.json", {"devices": {"17": {"active": [2, 50], "inactive": [20, 60], "finish_time": 100,
                                                    "duration": 1, "model": "x"}}})
    t = avail({"kind": "file", "path": "fs.json"}, tmp_path)
    assert t.changes(250) == [(0.0, False), (2.0, True), (20.0, False), (50.0, True), (60.0, False),
                              (102.0, True), (120.0, False), (150.0, True), (160.0, False),
                              (202.0, True), (220.0, False), (250.0, True)]
    assert t.online_at(155.0) and not t.online_at(199.0)
    assert t.changes(250, since_s=120.0) == t.changes(250)[7:]


def test_period_boundary_does_not_repeat_an_unchanged_state(tmp_path: Path) -> None:
    write(tmp_path, "p.json", {"active": [[0, 5], [8, 10]]})
    t = avail({"kind": "file", "path": "p.json", "period_s": 10}, tmp_path)
    assert t.changes(25) == [(0.0, True), (5.0, False), (8.0, True), (15.0, False), (18.0, True), (25.0, False)]


def test_toml_and_csv_with_device_selection(tmp_path: Path) -> None:
    write(tmp_path, "f.toml", '[devices.pi-a]\nactive = [[0, 5]]\n[devices.pi-b]\ninactive = [[1, 2]]\n')
    by_spec = avail({"kind": "file", "path": "f.toml", "device": "pi-b"}, tmp_path)
    assert by_spec.changes(10) == [(0.0, True), (1.0, False), (2.0, True)]
    by_name = avail({"kind": "file", "path": "f.toml"}, tmp_path, device="pi-a")
    assert by_name.changes(10) == [(0.0, True), (5.0, False)]
    by_index = avail({"kind": "file", "path": "f.toml"}, tmp_path, device="rpi4-07", index=3)
    assert by_index.changes(10) == by_spec.changes(10)  # 3 mod 2 = the second device
    with pytest.raises(ConfigError, match="holds 2 devices"):
        avail({"kind": "file", "path": "f.toml"}, tmp_path, device="rpi4-07")
    with pytest.raises(ConfigError, match="no device 'pi-z'"):
        avail({"kind": "file", "path": "f.toml", "device": "pi-z"}, tmp_path)
    write(tmp_path, "f.csv", "device,start_s,end_s,state\nx,0,5,active\ny,3,4,inactive\nx,9,12,active\n")
    t = avail({"kind": "file", "path": "f.csv", "device": "x"}, tmp_path)
    assert t.changes(20) == [(0.0, True), (5.0, False), (9.0, True), (12.0, False)]
    write(tmp_path, "one.csv", "start_s,end_s,state\n1,2,active\n")
    assert avail({"kind": "file", "path": str(tmp_path / "one.csv")}).changes(5) == [(0.0, False), (1.0, True),
                                                                                    (2.0, False)]


@pytest.mark.parametrize(("content", "message"), [
    ({"active": [[0, 10], [5, 20]]}, r"active interval \[5, 20\) \(active\[1\]\) overlaps .*\[0, 10\)"),
    ({"active": [[30, 40], [0, 10]]}, r"active interval \[0, 10\) \(active\[1\]\) is out of order"),
    ({"active": [[-1, 10]]}, r"\[-1, 10\) \(active\[0\]\) has a negative time"),
    ({"active": [[10, 10]]}, r"\[10, 10\) \(active\[0\]\) has start >= end"),
    ({"active": [[0, 10]], "inactive": [[8, 12]]}, r"inactive interval \[8, 12\) \(inactive\[0\]\) overlaps"),
    ({"active": [0, 5], "inactive": [3]}, "2 active times but 1 inactive"),
    ({"active": [[0, "x"]]}, r"active\[0\]: 'x' is not a finite number"),
    ({"active": [[0, 1, 2]]}, "not a \\[start, end\\] pair"),
    ({"active": [[0, 120]], "finish_time": 100}, "ends after the period 100"),
    ({"activ": [[0, 1]]}, "expected a table with 'active'"),
])
def test_bad_availability_files_name_file_device_and_interval(tmp_path: Path, content: Any, message: str) -> None:
    write(tmp_path, "bad.json", {"devices": {"pi-3": content}})
    with pytest.raises(ConfigError, match=message) as info:
        avail({"kind": "file", "path": "bad.json"}, tmp_path)
    assert "bad.json" in str(info.value) and "'pi-3'" in str(info.value)


def test_bad_csv_rows_name_the_line(tmp_path: Path) -> None:
    write(tmp_path, "b.csv", "device,start_s,end_s,state\nd1,0,10,active\nd1,5,15,active\n")
    with pytest.raises(ConfigError, match=r"b\.csv: device 'd1': active interval \[5, 15\) \(line 3\) overlaps"):
        avail({"kind": "file", "path": "b.csv"}, tmp_path)
    write(tmp_path, "s.csv", "device,start_s,end_s,state\nd1,0,10,up\n")
    with pytest.raises(ConfigError, match="line 2: state 'up'"):
        avail({"kind": "file", "path": "s.csv"}, tmp_path)
    write(tmp_path, "h.csv", "dev,begin,end,state\n")
    with pytest.raises(ConfigError, match="header"):
        avail({"kind": "file", "path": "h.csv"}, tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        avail({"kind": "file", "path": "missing.csv"}, tmp_path)
    write(tmp_path, "x.yaml", "")
    with pytest.raises(ConfigError, match=r"\.csv, \.json or \.toml"):
        avail({"kind": "file", "path": "x.yaml"}, tmp_path)


# --------------------------------------------------------------------------------- CPU files
def test_cpu_files(tmp_path: Path) -> None:
    write(tmp_path, "c.csv", "time_s,value\n5,0.5\n10,0.5\n20,1\n")
    t = cpu({"kind": "file", "path": "c.csv"}, tmp_path)
    assert t.changes(100) == [(0.0, 0.5), (20.0, 1.0)]  # first value holds from 0; repeats dropped
    assert t.value_at(19.9) == 0.5 and t.value_at(1e9) == 1.0
    write(tmp_path, "c.json", {"devices": {"a": [[0, 0.3], [4, 0.6]], "b": [[0, 1.0]]}})
    assert cpu({"kind": "file", "path": "c.json"}, tmp_path, device="a").value_at(4.0) == 0.6
    write(tmp_path, "p.toml", "points = [[0, 0.25], [60, 0.75]]\n")
    assert cpu({"kind": "file", "path": "p.toml"}, tmp_path).changes(60, since_s=0) == [(60.0, 0.75)]


@pytest.mark.parametrize(("content", "message"), [
    ("time_s,value\n0,0.5\n0,0.6\n", "line 3: time 0 is negative or not after the previous"),
    ("time_s,value\n-1,0.5\n", "line 2: time -1 is negative"),
    ("time_s,value\n0,1.5\n", r"line 2: value 1.5 is outside \(0, 1\]"),
    ("time_s,value\n0,0\n", "value 0 is outside"),
    ("time_s,value\n0\n", "line 2 has 1 fields"),
    ("time_s,value\n", "holds no device traces"),
])
def test_bad_cpu_files(tmp_path: Path, content: str, message: str) -> None:
    write(tmp_path, "bad.csv", content)
    with pytest.raises(ConfigError, match=message) as info:
        cpu({"kind": "file", "path": "bad.csv"}, tmp_path)
    assert "bad.csv" in str(info.value)


# ------------------------------------------------------------------------------------ driver
class VirtualClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_driver_applies_every_change_once_in_time_order(tmp_path: Path) -> None:
    write(tmp_path, "a.json", {"devices": {"d1": {"inactive": [[10, 20], [25, 26]]}, "d2": {"active": [[5, 50]]}}})
    availability = {d: avail({"kind": "file", "path": "a.json"}, tmp_path, device=d) for d in ("d1", "d2")}
    write(tmp_path, "c.csv", "device,time_s,value\nd1,0,1.0\nd1,15,0.5\nd2,0,0.8\n")
    cpu_traces = {d: cpu({"kind": "file", "path": "c.csv"}, tmp_path, device=d) for d in ("d1", "d2")}
    calls: list[tuple[str, str, Any]] = []
    clock = VirtualClock()
    driver = TraceDriver(availability, cpu_traces, lambda d, v: calls.append(("online", d, v)),
                         lambda d, v: calls.append(("cpu", d, v)), clock=clock)
    driver.step()  # t = 0: every device's initial state, online before cpu
    assert calls == [("online", "d1", True), ("online", "d2", False), ("cpu", "d1", 1.0), ("cpu", "d2", 0.8)]
    calls.clear()
    clock.t += 4.9
    assert driver.step() == [] and calls == []
    clock.t += 25.1  # t = 30: d2 on (5), d1 off (10), d1 cpu (15), d1 on (20), off (25), on (26)
    events = driver.step()
    assert [e.t_s for e in events] == [5.0, 10.0, 15.0, 20.0, 25.0, 26.0]
    assert calls == [("online", "d2", True), ("online", "d1", False), ("cpu", "d1", 0.5),
                     ("online", "d1", True), ("online", "d1", False), ("online", "d1", True)]
    assert driver.online == {"d1": True, "d2": True} and driver.cpu_fraction == {"d1": 0.5, "d2": 0.8}
    calls.clear()
    assert driver.step(clock.t) == [] and calls == []  # same instant: nothing new
    assert driver.step(clock.t - 10) == []  # clock went backwards
    clock.t += 20.0
    assert [(e.device, e.value) for e in driver.step()] == [("d2", False)] and calls == [("online", "d2", False)]


def test_driver_with_markov_matches_the_trace_on_any_tick_pattern() -> None:
    traces = {f"dev{i}": avail(MARKOV, seed=i) for i in range(5)}
    seen: dict[str, list[bool]] = {d: [] for d in traces}
    clock = VirtualClock(0.0)
    driver = TraceDriver(traces, {}, lambda d, v: seen[d].append(v), lambda d, v: None, clock=clock, start=0.0)
    rng = np.random.default_rng(0)
    while clock.t < 3000.0:
        driver.step()
        clock.t += float(rng.uniform(0.0, 40.0))
    end = clock.t
    driver.step()
    for d, tr in traces.items():
        assert seen[d] == [v for _, v in tr.changes(end)]
        assert driver.online[d] == tr.online_at(end)


def test_single_device_file_errors_name_the_emulated_device(tmp_path: Path) -> None:
    write(tmp_path, "one.json", {"active": [[5, 1]]})
    with pytest.raises(ConfigError, match=r"one\.json: device 'rpi4-03': active interval \[5, 1\) \(active\[0\]\)"):
        avail({"kind": "file", "path": "one.json"}, tmp_path, device="rpi4-03")
