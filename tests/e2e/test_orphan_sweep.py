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
    first = campaign_file(tmp_path, "orphaned", SMALL_FLEET, rounds=500, duration_board_s=300)
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

    second = campaign_file(tmp_path, "sweeper", ONE_DEVICE, rounds=1, duration_board_s=20)
    proc = orchard("campaign", "run", str(second), "--out", str(tmp_path / "run2"), "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    swept = [ln for ln in proc.stderr.splitlines() if f"left by runner pid {runner.pid}" in ln]
    assert len(swept) == 1 and "stopped 5 process groups" in swept[0], proc.stderr
    assert [p for p in procs if _alive(p)] == []
    assert orchard_cgroups_left("orphaned", before) == []
    assert not any(Path(p).exists() for p in record["paths"])
    assert not path.exists() and list(state.glob("run-*.json")) == []  # the second run removed its own, too


def _kill_when_recorded(cmd: list[str], state: Path, names: set[str], env: dict[str, str],
                        log: Path, timeout_s: float = 120) -> tuple[Path, dict, int]:
    """Start `cmd`, SIGKILL it once its ledger names every process in `names`; (ledger path,
    record, the killed pid)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + timeout_s
        ledger = None
        while time.monotonic() < deadline:
            ledger = _ledger(state)
            if ledger is not None and names <= {p["name"] for p in ledger[1]["procs"]}:
                break
            assert proc.poll() is None, f"{cmd[3:5]} ended before it could be killed: {log.read_text()[-1500:]}"
            time.sleep(0.2)
        else:
            pytest.fail(f"{cmd[3:5]} never recorded {names}: {ledger}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return ledger[0], ledger[1], proc.pid


def test_next_lab_broker_stops_the_broker_a_sigkilled_one_left(tmp_path, mosquitto_bin):
    from testbed.broker import free_port, port_accepts
    from testbed.lab import init_lab
    from tests.integration.test_lab import CAMPAIGN

    (tmp_path / "lab.toml").write_text(CAMPAIGN)
    port = free_port("127.0.0.1")
    lab = init_lab(tmp_path / "lab", tmp_path / "lab.toml", broker_host="127.0.0.1", port=port)
    state = tmp_path / "state"
    env = {"ORCHARD_RUNS_STATE": str(state), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "testbed.cli", "broker", "--lab", str(lab.folder), "--listen", "127.0.0.1"]
    path, record, killed = _kill_when_recorded(cmd, state, {"broker"}, env, tmp_path / "first.log")
    (broker,) = record["procs"]
    assert _alive(broker) and port_accepts("127.0.0.1", port), "the broker should outlive its killed command"
    assert record["run"] == str(lab.folder) and all(Path(p).is_dir() for p in record["paths"])

    second = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 60
        while path.exists() or _ledger(state) is None or not _ledger(state)[1]["procs"]:  # swept, then its own
            assert second.poll() is None and time.monotonic() < deadline, second.communicate()
            time.sleep(0.1)
        assert port_accepts("127.0.0.1", port)  # its own broker, on the port the old one held
    finally:
        second.send_signal(signal.SIGTERM)
        _, err = second.communicate(timeout=30)
    assert second.returncode == 0, err
    swept = [ln for ln in err.splitlines() if f"left by runner pid {killed}" in ln]
    assert len(swept) == 1 and "stopped 1 process groups (broker" in swept[0], err
    assert not _alive(broker) and not any(Path(p).exists() for p in record["paths"])
    assert not path.exists() and list(state.glob("run-*.json")) == []


MPSL_RUNS = """
[defaults]
model = "cnn"
dataset = "digits"
batch = 8
samples_per_owner = 32
test_samples = 50
lr = 0.05
[[run]]
mode = "mpsl"
owners = 2
nodes = 2
epochs = 1000
[[run]]
mode = "fedavg"
owners = 1
epochs = 1
"""


def _mpsl_cgroups(record: dict) -> list[str]:
    return [leaf for leaf in record["cgroups"] if Path(leaf).is_dir()]


def test_next_mpsl_run_stops_the_nodes_and_owners_a_sigkilled_one_left(tmp_path, cgroups):
    (tmp_path / "runs.toml").write_text(MPSL_RUNS)
    state = tmp_path / "state"
    env = {"ORCHARD_RUNS_STATE": str(state)}
    base = [sys.executable, "-m", "testbed.cli", "mpsl", "run", str(tmp_path / "runs.toml"), "--no-links"]
    names = {"node1", "node2", "own0", "own1"}
    path, record, killed = _kill_when_recorded([*base, "--only", "0", "--out", str(tmp_path / "a")], state, names,
                                               env, tmp_path / "first.log", timeout_s=240)
    nodes = [p for p in record["procs"] if p["name"].startswith("node")]
    assert all(_alive(p) for p in nodes), "the compute nodes should outlive their killed run"
    assert len(_mpsl_cgroups(record)) >= 4, record["cgroups"]  # one per node and owner, per hierarchy

    proc = orchard("mpsl", "run", str(tmp_path / "runs.toml"), "--no-links", "--only", "1", "--out",
                   str(tmp_path / "b"), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    swept = [ln for ln in proc.stderr.splitlines() if f"left by runner pid {killed}" in ln]
    assert len(swept) == 1, proc.stderr
    assert [p for p in record["procs"] if _alive(p)] == []
    assert _mpsl_cgroups(record) == []
    assert not path.exists() and list(state.glob("run-*.json")) == []
