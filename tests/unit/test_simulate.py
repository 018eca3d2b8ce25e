"""`orchard simulate`: real training of sampled clients on the virtual clock (small: digits, LeNet)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.board import load_board
from runtime.errors import ConfigError
from testbed.campaign import load_campaign
from testbed.simulate import TraceAvailability, run_simulation
from testbed.traces import make_availability

CAMPAIGN = """
[campaign]
name = "sim"
seed = 3
[model]
name = "lenet"
dataset = "digits"
partition = "iid"
{method}
[train]
local_steps = 8
lr = 0.1
batch_size = 16
[[fleet]]
name = "pi5"
board = "rpi5"
count = 1
[[fleet]]
name = "pi4"
board = "rpi4b-4gb"
count = 1
{extra}
"""


def write(tmp_path: Path, method: str = "", extra: str = "") -> Path:
    path = tmp_path / "sim.toml"
    path.write_text(CAMPAIGN.format(method=method, extra=extra))
    return path


def test_sampled_clients_train_for_real_on_the_virtual_clock(tmp_path: Path) -> None:
    c = load_campaign(write(tmp_path))
    result = run_simulation(c, 40, 4, 5, workers=1, out=tmp_path / "out")
    s, curve = result.summary, result.curve
    assert s["rounds"] == 5 and s["clients"] == 40 and s["finish_reason"] == "reached version 5"
    rounds = [set(p["clients"]) for p in curve]
    assert all(len(r) == 4 for r in rounds) and len({frozenset(r) for r in rounds}) == 5
    # Real training: well above the 10 % of chance after five rounds of 4 clients x 8 steps.
    assert curve[-1]["accuracy"] > 0.3 and curve[-1]["accuracy"] > curve[0]["accuracy"]
    # Virtual time: a synchronous round lasts as long as its slowest client, local_steps x board step.
    step_s = {b: s["host_step_ms"] / 1e3 * s["host_speed_factor"] / load_board(b).speed_factor
              for b in ("rpi5", "rpi4b-4gb")}
    first = curve[0]
    slowest = max(step_s["rpi4b-4gb" if cid.startswith("pi4") else "rpi5"] for cid in first["clients"]) * 8
    assert first["t_s"] == pytest.approx(slowest, rel=0.01, abs=1e-3)  # both rounded in the summary
    assert [p["t_s"] for p in curve] == sorted(p["t_s"] for p in curve)
    assert json.loads((tmp_path / "out" / "simulation.json").read_text())["summary"]["rounds"] == 5


def test_offline_clients_are_not_sampled(tmp_path: Path) -> None:
    # The pi4 group (the last [[fleet]], so `extra` lands in it) is off for ~10^6 s from the start.
    off = 'availability = { kind = "markov", mean_on_s = 1, mean_off_s = 1000000, start = "off" }'
    curve = run_simulation(load_campaign(write(tmp_path, extra=off)), 20, 3, 2, workers=1).curve
    assert all(cid.startswith("pi5") for p in curve for cid in p["clients"])


def test_trace_availability_finds_the_next_change(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"active": [[0, 10], [5000, 5010]]}))
    avail = TraceAvailability(make_availability({"kind": "file", "path": "a.json"}, seed=0, base_dir=tmp_path))
    assert avail.online_at(1) and not avail.online_at(10)
    assert avail.next_change(1) == 10 and avail.next_change(10) == 5000 and avail.next_change(5010) is None


@pytest.mark.parametrize("method, n, per_round, needle", [
    ("", 10, 11, "--per-round 11 is more than --clients 10"),
    ("", 0, 1, "--clients must be >= 1; got 0"),
    ("", 5000, 10, "--clients 5000: [model] partition iid: n_parts"),
    ('[method]\nname = "heterofl"', 10, 2, "fedavg on the dense model only"),
])
def test_bad_simulation_input_is_one_clear_error(tmp_path: Path, method: str, n: int, per_round: int,
                                                  needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        run_simulation(load_campaign(write(tmp_path, method)), n, per_round, 2)
    assert needle in str(info.value) and "\n" not in str(info.value)
