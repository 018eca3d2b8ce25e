"""A SIGKILLed campaign runner leaves its broker, server, devices and cgroups; the next run stops them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.orphans import same_process
from tests.e2e.test_campaign import ROOT, SMALL_FLEET, campaign_file, cgroups, orchard, orchard_cgroups_left

__all__ = ["cgroups"]  # the fixture, used by name

ONE_DEVICE = """
[[fleet]]
name = "orin"
board = "jetson-orin-nano"
count = 1
"""


def _ledger(state: Path) -> tuple[Path, dict] | None:
    for path in state.glob("run-*.json"):
        try:
            return path, json.loads(path.read_text())
        except ValueError:
            continue
    return None


def _alive(entry: dict) -> bool:
    return same_process(entry["pid"], entry["start"], entry["cmdline"])


def test_next_run_stops_what_a_sigkilled_runner_left(tmp_path, cgroups):
    state = tmp_path / "state"
    env = {"ORCHARD_RUNS_STATE": str(state)}
    first = campaign_file(tmp_path, "orphaned", SMALL_FLEET, rounds=500, wall_s=300)
    before = frozenset(orchard_cgroups_left("orphaned"))
    runner = subprocess.Popen([sys.executable, "-m", "testbed.cli", "campaign", "run", str(first), "--out",
                               str(tmp_path / "run1"), "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 120
        ledger = None
        while time.monotonic() < deadline:  # broker, server and the three devices recorded
            ledger = _ledger(state)
            if ledger is not None and len(ledger[1]["procs"]) >= 5:
                break
            assert runner.poll() is None, "the first campaign ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail(f"the runner never recorded its processes: {ledger}")
        time.sleep(2.0)  # the devices get going (and start their trainer children)
        runner.send_signal(signal.SIGKILL)  # the runner only: its children live on in their own groups
        runner.wait(10)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    path, record = ledger
    procs = record["procs"]
    assert {p["name"] for p in procs} == {"broker", "server", "pi5-0", "pi5-1", "orin-0"}
    assert record["owner"]["pid"] == runner.pid
    orphans = [p for p in procs if _alive(p)]
    assert len(orphans) == 5, f"orphans expected alive after SIGKILL, got {orphans}"
    assert orchard_cgroups_left("orphaned", before), "the killed run's cgroups should be left behind"
    assert all(Path(p).is_dir() for p in record["paths"])  # the broker's scratch dir

    second = campaign_file(tmp_path, "sweeper", ONE_DEVICE, rounds=1, wall_s=20)
    proc = orchard("campaign", "run", str(second), "--out", str(tmp_path / "run2"), "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    swept = [ln for ln in proc.stderr.splitlines() if f"left by runner pid {runner.pid}" in ln]
    assert len(swept) == 1 and "stopped 5 process groups" in swept[0], proc.stderr
    assert [p for p in procs if _alive(p)] == []
    assert orchard_cgroups_left("orphaned", before) == []
    assert not any(Path(p).exists() for p in record["paths"])
    assert not path.exists() and list(state.glob("run-*.json")) == []  # the second run removed its own, too
