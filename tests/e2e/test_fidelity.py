"""Emulation fidelity of the default campaign, end to end, with real cgroups and real ORT:
board step-time ratios follow the speed factors with and without a busy loop on one core; the
two runs get the same quotas (the first calibrates the host, the second finds it cached), and
calibrations taken with and without the busy loop, in alternation, agree.

Why the checks are shaped as they are (measured; README "Fidelity figures"):
- The campaign runs 20 rounds instead of stopping at its target accuracy (8-13 rounds), so
  the on/off Pi 4 tier contributes 2-17 tasks no more: the median of two or four tasks is not a
  measurement, and a Pi 4 / Pi 5 ratio of medians over 4 tasks came out 19.5 % off where the runs
  with 10-17 tasks stay within 0-12 %.
- Back-to-back calibrations agree to 0.3 %, but this VM's CPU second drifts by far more over
  minutes to hours (5.05 -> 4.22 in one evening; a quiet calibration in a full `make test` read
  5.154 where one 2 min later under the busy loop read 4.52). So the busy-loop check alternates
  the two conditions (busy, idle, idle, busy) and compares medians: drift cancels, a calibration
  that really moved with a busy core does not.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runtime.board import load_board
from tests.e2e.test_campaign import ROOT, orchard, require_cgroups

DEFAULT = ROOT / "campaigns" / "default.toml"
TOLERANCE = 0.20


@pytest.fixture
def cgroups() -> None:
    require_cgroups()


def fresh_calibration_env(tmp: Path) -> dict[str, str]:
    """A cache without a host speed (so the first run measures it) that shares the built artifacts."""
    real = Path(os.environ.get("ORCHARD_CACHE") or Path.home() / ".cache" / "orchard") / "artifacts"
    real.mkdir(parents=True, exist_ok=True)
    if not tmp.exists():
        tmp.mkdir(parents=True)
        (tmp / "artifacts").symlink_to(real, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "ORCHARD_HOST_SPEED"}
    return {**env, "ORCHARD_CACHE": str(tmp)}


ROUNDS = 20


def full_rounds_campaign(tmp: Path) -> Path:
    """The default campaign, run to a fixed number of rounds instead of stopping at its target accuracy."""
    path = tmp / "default-full.toml"
    if not path.exists():
        text = DEFAULT.read_text()
        assert "\ntarget_accuracy = 0.93" in text and "\nrounds = 30" in text
        # 20 rounds, not the file's 30: 16 Pi 4 tasks per run (measured), inside the suite's 15 min budget
        path.write_text(text.replace("\ntarget_accuracy = 0.93", "\n").replace("\nrounds = 30", f"\nrounds = {ROUNDS}"))
    return path


def run_default(tmp: Path, name: str) -> dict[str, Any]:
    run = tmp / name
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "campaign", "run", str(full_rounds_campaign(tmp)),
                           "--out", str(run),
                           "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=fresh_calibration_env(tmp / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "time dilation" in proc.stdout
    return {"run": run, "stdout": proc.stdout, "summary": json.loads((run / "summary.json").read_text()),
            "fleet": json.loads((run / "fleet.json").read_text())}


def tasks_from_events(run: Path, fleet: dict[str, Any], dilation: float) -> dict[str, list[tuple[float, float, float]]]:
    """Per tier, each accepted task's (board ms per step, trainer CPU ms per step, delivered share
    of its quota), read straight from events.jsonl: an independent check of the report's figure.
    A step's board time is CPU per step / (board quota x delivered), so when a ratio is off the
    other two say whether the same work cost more CPU or got less of its quota."""
    board = {d["id"]: d["group"] for d in fleet["devices"]}
    tasks: dict[str, list[tuple[float, float, float]]] = {}
    for line in (run / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e.get("event") == "update_accepted":
            m = e["metrics"]
            delivered = m["cpu_s"] / (e["train_s"] * dilation * m["cpu_quota_cores"])
            tasks.setdefault(board[e["device"]], []).append(
                (e["train_s"] * 1e3 / m["steps"], m["cpu_s"] * 1e3 / m["steps"], delivered))
    return tasks


def wall_s_as_the_default_campaign(run: Path, started_unix: float, target: float = 0.93) -> float:
    """Wall time from launch until the default campaign would have stopped (its first evaluation
    at the target accuracy, plus this run's own teardown): `make campaign`'s budget."""
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    at = {e["event"]: e["wall_t"] for e in events if e.get("event") in ("campaign_stopping", "campaign_stop")}
    hit = next((e["wall_t"] for e in events if e.get("event") == "evaluate" and e["accuracy"] >= target), None)
    assert hit is not None, f"the campaign never evaluated at accuracy >= {target}"
    return hit - started_unix + (at["campaign_stop"] - at["campaign_stopping"])


MIN_TASKS = 8  # per tier; 20 rounds gave the Pi 4 tier 16 (30 rounds gave 27-30)


def check_ratio(result: dict[str, Any]) -> float:
    expected = load_board("rpi5").speed_factor / load_board("rpi4b-4gb").speed_factor
    dilation = result["summary"]["time_dilation"]
    tasks = tasks_from_events(result["run"], result["fleet"], dilation)
    med = {g: [statistics.median(t[i] for t in v) for i in range(3)] for g, v in tasks.items()}
    reported = {g["group"]: g["task_step_ms_median"] for g in result["summary"]["groups"]}
    for group in ("pi4", "pi5"):  # the default campaign's Pi 4 and Pi 5 tiers
        assert reported[group] == pytest.approx(med[group][0], abs=1e-3)
    ratio = med["pi4"][0] / med["pi5"][0]
    print(f"dilation {dilation}: Pi 4 {med['pi4'][0]:.2f} ms, Pi 5 {med['pi5'][0]:.2f} ms per step, ratio "
          f"{ratio:.3f} (speed factors: {expected:.3f}); tasks {len(tasks['pi4'])} / {len(tasks['pi5'])}; CPU per "
          f"step {med['pi4'][1]:.2f} / {med['pi5'][1]:.2f} ms; delivered {med['pi4'][2]:.3f} / {med['pi5'][2]:.3f}")
    assert min(len(tasks["pi4"]), len(tasks["pi5"])) >= MIN_TASKS, {g: len(v) for g, v in tasks.items()}
    assert abs(ratio / expected - 1) <= TOLERANCE, (ratio, expected, med)
    return ratio


def start_busy_loop() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"])


def stop(burner: subprocess.Popen[bytes]) -> None:
    burner.kill()
    burner.wait()


def host_speeds_busy_and_idle(burner: subprocess.Popen[bytes]) -> tuple[list[float], list[float]]:
    """Host speed measured afresh four times, busy loop on CPU 0 / off / off / on (the given
    burner is running at the start and is stopped here)."""
    from testbed.calibrate import measure_host_speed

    busy, idle = [measure_host_speed().speed_factor], []
    stop(burner)
    idle += [measure_host_speed().speed_factor, measure_host_speed().speed_factor]
    burner = start_busy_loop()
    try:
        busy.append(measure_host_speed().speed_factor)
    finally:
        stop(burner)
    return busy, idle


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_board_ratios_and_quotas_hold_with_and_without_a_busy_core(tmp_path: Path, cgroups: None) -> None:
    started_unix = time.time()
    quiet = run_default(tmp_path, "quiet")
    # `make campaign`'s budget, calibration included, to where the default campaign stops
    assert wall_s_as_the_default_campaign(quiet["run"], started_unix) < 180
    # A busy loop on CPU 0 for the whole second run, calibration included.
    burner = start_busy_loop()
    try:
        loaded = run_default(tmp_path, "loaded")
    except BaseException:
        stop(burner)
        raise
    busy_speeds, idle_speeds = host_speeds_busy_and_idle(burner)
    ratios: list[float] = []
    assert (quiet["summary"]["host_speed_source"], loaded["summary"]["host_speed_source"]) == ("measured", "cache")
    for r in (quiet, loaded):
        s = r["summary"]
        assert s["host_speed_factor"] > 0
        assert s["time_dilation"] == r["fleet"]["dilation"]["factor"] >= 1.0
        assert f"time dilation {s['time_dilation']:.1f}" in r["stdout"] or s["time_dilation"] == 1.0
        assert "time dilation" in (r["run"] / "report.html").read_text()
        ratios.append(check_ratio(r))
    # The busy core is seen at launch (other tenants of a shared host come and go, so no more is asserted).
    assert loaded["summary"]["dilation"]["background_cores"] >= 0.9
    # The same campaign gets the same board quotas, loaded or not (the calibration is cached per host).
    q1 = {d["id"]: d["board_quota_cores"] for d in quiet["fleet"]["devices"]}
    q2 = {d["id"]: d["board_quota_cores"] for d in loaded["fleet"]["devices"]}
    for device, quota in q1.items():
        assert abs(q2[device] / quota - 1) <= 0.05, (device, quota, q2[device])
    # Measured in CPU time, the host speed barely moves with a busy core (wall-time calibration
    # moved 1.33-4.49 with load). 10 %: neighbours on a shared VM still pollute caches.
    busy, idle = statistics.median(busy_speeds), statistics.median(idle_speeds)
    print(f"MEASURED quiet ratio {ratios[0]:.3f}, loaded ratio {ratios[1]:.3f}; host speed "
          f"{quiet['summary']['host_speed_factor']} at the quiet run's start; measured afresh with / without the "
          f"busy loop, alternating: {busy_speeds} / {idle_speeds}")
    assert abs(busy / idle - 1) <= 0.10, (busy_speeds, idle_speeds)


@pytest.mark.slow
def test_dilation_off_on_an_oversubscribed_host_is_flagged_red(tmp_path: Path, cgroups: None) -> None:
    text = DEFAULT.read_text().replace('require = false', 'require = false\ndilation = "off"\nhost_speed = 2.0')
    text = text.replace("target_accuracy = 0.93", "target_accuracy = 0.5").replace("rounds = 30", "rounds = 2")
    path = tmp_path / "off.toml"
    path.write_text(text)
    run = tmp_path / "off"
    # host_speed = 2.0 pins a slow host: the fleet asks for 6.9 cores, far beyond 2.
    proc = orchard("campaign", "run", str(path), "--out", str(run), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU OVERSUBSCRIBED" in proc.stderr and "time dilation off" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["time_dilation"] == 1.0 and summary["host_speed_source"] == "campaign"
    assert summary["host_speed_factor"] == 2.0
    report = (run / "report.html").read_text()
    assert "<p class='warn'>⚠ CPU OVERSUBSCRIBED" in report
