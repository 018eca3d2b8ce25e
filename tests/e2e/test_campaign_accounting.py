"""Campaigns end to end, for what they account: energy traces, wasted work, and failures that must
not pass silently (devices that never join, checks that fail before launch)."""

from __future__ import annotations

import csv
import itertools
import json
import time
from pathlib import Path

import pytest

from runtime.board import load_board
from tests.e2e.test_campaign import SMALL_FLEET, campaign_file, cgroups, events, orchard

__all__ = ["cgroups"]  # the fixture, shared with test_campaign.py


def csv_energy_j(path: Path) -> float:
    """Integrate a device CSV by hand: the first row's cumulative energy, then Σ power_w · Δt."""
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["power_w"]]
    total = float(rows[0]["energy_total_j"])
    for prev, row in itertools.pairwise(rows):
        # A restarted agent: a new segment (as the report counts it).
        if float(row["energy_total_j"]) < float(prev["energy_total_j"]):
            total += float(row["energy_total_j"])
        else:
            total += float(row["power_w"]) * (float(row["t_s"]) - float(prev["t_s"]))
    return total


def test_default_campaign_energy_adds_up_and_wastes_little(default_run):
    run, proc = default_run.run, default_run.proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    work = summary["wasted_work"]
    assert work["wasted_fraction"] is not None and work["wasted_fraction"] < 0.10, work
    assert set(work["devices"]) == {d["id"] for d in summary["devices"]}
    tasks_j: dict[str, float] = {}
    for e in events(run):
        if e["event"] == "update_accepted":
            tasks_j[e["device"]] = tasks_j.get(e["device"], 0.0) + float(e["energy_j"])
    # A device still starting when the run ends (the Zero 2 W imports ORT on 0.05 cores) has no trace.
    traced = [d for d in summary["devices"] if d["energy_j"] is not None]
    assert len(traced) >= len(summary["devices"]) // 2, summary["devices"]
    for d in traced:
        total = d["energy_j"]
        by_hand = csv_energy_j(run / "devices" / f"{d['id']}.csv")
        assert abs(by_hand - total) <= 0.01 * total, (d["id"], by_hand, total)
        # The tasks' energies are parts of the device's total (idle time is the rest).
        assert 0.0 <= tasks_j.get(d["id"], 0.0) <= total * 1.0001, (d["id"], tasks_j.get(d["id"]), total)
    assert any(v > 0 for v in tasks_j.values())
    assert "Wasted work" in (run / "report.html").read_text()


NEVER_JOIN = """
[[fleet]]
name = "asleep"
board = "rpi5"
count = 2
availability = { kind = "markov", mean_on_s = 1, mean_off_s = 100000, start = "off" }
[[fleet]]
name = "tiny"
board = "rpi5"
count = 1
mem_limit_mb = 10
"""


def test_devices_that_never_join_fail_the_campaign_with_one_line_naming_them(tmp_path, cgroups):
    path = campaign_file(tmp_path, "nojoin", NEVER_JOIN, duration_board_s=8)
    run = tmp_path / "run"
    proc = orchard("campaign", "run", str(path), "--out", str(run), "--quiet")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = lines[-1]
    assert last.startswith("error: campaign 'nojoin' made 0 aggregations"), last
    assert "3 of 3 devices never said hello: asleep-0, asleep-1, tiny-0" in last, last
    summary = json.loads((run / "summary.json").read_text())
    reasons = {d["id"]: d["reason"] for d in summary["never_joined"]}
    assert set(reasons) == {"asleep-0", "asleep-1", "tiny-0"}
    assert "frozen by its availability trace from" in reasons["asleep-0"] and "to the end" in reasons["asleep-0"]
    assert "exited" in reasons["tiny-0"] or "OOM" in reasons["tiny-0"], reasons["tiny-0"]
    assert "Devices that never joined" in (run / "report.html").read_text()


def test_check_that_fails_while_laying_out_leaves_no_run_folder(tmp_path):
    path = campaign_file(tmp_path, "nodata", SMALL_FLEET,
                         extra="")
    text = path.read_text().replace('dataset = "digits"', f'dataset = "mnist"\ndata_root = "{tmp_path / "none"}"')
    path.write_text(text)
    run = tmp_path / "run"
    proc = orchard("campaign", "run", str(path), "--out", str(run), "--quiet", "--no-throttle")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert not run.exists()


def test_min_devices_from_the_campaign_file(tmp_path):
    path = campaign_file(tmp_path, "min", SMALL_FLEET, extra="")
    path.write_text(path.read_text().replace('seed = 1\n', 'seed = 1\nmin_devices = 9\n', 1))
    proc = orchard("campaign", "run", str(path), "--out", str(tmp_path / "run"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "[campaign] min_devices = 9 is more than the fleet's 3 devices" in lines[0]


ALL_DIE = """
[[fleet]]
name = "tiny"
board = "rpi5"
count = 2
mem_limit_mb = 10
"""


def test_a_fleet_that_keeps_dying_before_hello_stops_early_and_fails(tmp_path, cgroups):
    path = campaign_file(tmp_path, "alldie", ALL_DIE, duration_board_s=300)
    started = time.monotonic()
    proc = orchard("campaign", "run", str(path), "--out", str(tmp_path / "run"), "--quiet")
    assert time.monotonic() - started < 150  # not duration_board_s (300 s) + grace
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "made 0 aggregations (every device exited 4 times without ever saying hello" in last, last
    assert "2 of 2 devices never said hello: tiny-0, tiny-1" in last, last


NAP = """
[[fleet]]
name = "on"
board = "rpi5"
count = 1
[[fleet]]
name = "nap"
board = "rpi5"
count = 1
availability = { kind = "file", path = "nap.json" }
"""


@pytest.mark.parametrize("offline", ["unreachable", "powered-off"])
def test_offline_mode_decides_what_a_frozen_spell_costs(tmp_path, cgroups, offline):
    (tmp_path / "nap.json").write_text(json.dumps({"inactive": [[6, 16]]}))  # frozen for 10 s mid-run
    path = campaign_file(tmp_path, "nap", NAP, rounds=1000, duration_board_s=20)  # 4 s past the thaw
    path.write_text(path.read_text().replace("seed = 1\n", f'seed = 1\noffline = "{offline}"\n', 1))
    run = tmp_path / "run"
    proc = orchard("campaign", "run", str(path), "--out", str(run), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    nap = next(d for d in summary["devices"] if d["id"] == "nap-0")
    assert abs(csv_energy_j(run / "devices" / "nap-0.csv") - nap["energy_j"]) <= 0.01 * nap["energy_j"]
    with (run / "devices" / "nap-0.csv").open(newline="") as f:
        full = [(float(r["t_s"]), float(r["power_w"]), float(r["energy_total_j"]))
                for r in csv.DictReader(f) if r["power_w"]]
    # No row lost, across the freeze and the reconnect: each row's mean power covers exactly the
    # span since the row before it.
    for a, b in itertools.pairwise(full):
        assert abs(b[1] * (b[0] - a[0]) - (b[2] - a[2])) <= 0.01 + 0.002 * (b[2] - a[2]), (a, b)
    rows = [(t, p) for t, p, _ in full]
    # The row that spans the freeze: its mean power is idle power when the board stays powered,
    # and only the few unfrozen seconds' share of it when it is off.
    span_s, power_w = max((b[0] - a[0], b[1]) for a, b in itertools.pairwise(rows))
    assert span_s > 7.0, rows
    p_idle = load_board("rpi5").power.p_idle_w
    if offline == "unreachable":
        assert power_w >= 0.9 * p_idle, (span_s, power_w)
    else:
        assert power_w <= 0.35 * p_idle, (span_s, power_w)
