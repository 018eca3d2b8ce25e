"""The stale-process sweep on real processes: what it stops, and what it must leave alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.orphans import RunLedger, proc_cmdline, proc_start, sweep_orphans


def _session(*argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(argv), start_new_session=True)


def _dead_owner() -> dict[str, object]:
    """The identity of a process that has exited (the SIGKILLed runner)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    owner = {"pid": proc.pid, "start": proc_start(proc.pid), "cmdline": proc_cmdline(proc.pid)}
    proc.kill()
    proc.wait()
    return owner


def _write_ledger(state: Path, owner: dict[str, object], procs: list[dict[str, object]]) -> Path:
    state.mkdir(exist_ok=True)
    path = state / f"run-{owner['pid']}-test.json"
    path.write_text(json.dumps({"owner": owner, "run": "/tmp/x", "procs": procs, "cgroups": [], "paths": []}))
    return path


def _entry(name: str, proc: subprocess.Popen[bytes]) -> dict[str, object]:
    return {"name": name, "pid": proc.pid, "start": proc_start(proc.pid), "cmdline": proc_cmdline(proc.pid)}


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


@pytest.fixture
def sleepers():
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait()


def test_dead_runner_groups_are_killed_and_the_ledger_removed(tmp_path, sleepers):
    a, b = _session("sleep", "60"), _session("sleep", "61")
    sleepers += [a, b]
    ledger = _write_ledger(tmp_path, _dead_owner(), [_entry("server", a), _entry("pi-0", b)])
    swept = sweep_orphans(tmp_path)
    assert [s.processes for s in swept] == [[f"server (pid {a.pid})", f"pi-0 (pid {b.pid})"]]
    assert a.wait(5) == -9 and b.wait(5) == -9
    assert not ledger.exists()
    assert "killed before it cleaned up" in swept[0].describe()


def test_a_reused_pid_or_another_program_is_left_alone(tmp_path, sleepers):
    a, b = _session("sleep", "60"), _session("sleep", "62")
    sleepers += [a, b]
    wrong_start = {**_entry("server", a), "start": str(int(str(proc_start(a.pid))) - 1)}
    wrong_cmdline = {**_entry("pi-0", b), "cmdline": ["sleep", "63"]}
    _write_ledger(tmp_path, _dead_owner(), [wrong_start, wrong_cmdline])
    assert sweep_orphans(tmp_path) == []
    time.sleep(0.2)
    assert _alive(a) and _alive(b)


def test_a_live_runner_is_never_swept(tmp_path, sleepers):
    a = _session("sleep", "60")
    sleepers.append(a)
    me = {"pid": os.getpid(), "start": proc_start(os.getpid()), "cmdline": proc_cmdline(os.getpid())}
    ledger = _write_ledger(tmp_path, me, [_entry("server", a)])
    assert sweep_orphans(tmp_path) == []
    assert _alive(a) and ledger.exists()


def test_a_group_whose_leader_exited_is_still_swept(tmp_path, sleepers):
    # The leader (a shell) exits and stays a zombie (nobody reaps it yet); its child lives on in its group.
    script = f"sleep 64 & echo $! > {tmp_path}/child; exit 0"
    leader = _session("sh", "-c", script)
    sleepers.append(leader)
    entry = _entry("device", leader)
    entry["cmdline"] = ["sh", "-c", script]
    child_file = tmp_path / "child"
    deadline = time.monotonic() + 5
    while not (child_file.exists() and child_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    child = int(child_file.read_text())
    assert os.getpgid(child) == leader.pid
    _write_ledger(tmp_path, _dead_owner(), [entry])
    assert [s.processes for s in sweep_orphans(tmp_path)] == [[f"device (pid {leader.pid})"]]
    assert _dead(child)


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_the_ledger_records_and_removes_itself(tmp_path, monkeypatch, sleepers):
    monkeypatch.setenv("ORCHARD_RUNS_STATE", str(tmp_path / "state"))
    a = _session("sleep", "60")
    sleepers.append(a)
    ledger = RunLedger().open(tmp_path / "run")
    ledger.add_process("broker", a.pid, Path("/tmp/orchard-amqtt-test"))
    ledger.add_process("external", None)  # a broker Orchard does not run: nothing to record
    record = json.loads(ledger.path.read_text())  # type: ignore[union-attr]
    assert record["owner"]["pid"] == os.getpid() and record["run"] == str(tmp_path / "run")
    assert [p["name"] for p in record["procs"]] == ["broker"] and record["paths"] == ["/tmp/orchard-amqtt-test"]
    path = ledger.path
    ledger.close()
    assert path is not None and not path.exists()
    RunLedger().add_process("inert", a.pid)  # never opened: records nothing, raises nothing


def test_an_owner_that_retitles_itself_is_known_by_pid_and_start_only(tmp_path, monkeypatch, sleepers):
    """A cluster node's launcher is a Ray worker, whose cmdline changes with each task it runs: its
    ledger must not look dead to another run's sweep while it lives (its devices' cgroups went)."""
    state = tmp_path / "state"
    monkeypatch.setenv("ORCHARD_RUNS_STATE", str(state))
    a = _session("sleep", "60")
    sleepers.append(a)
    renamed = RunLedger().open(tmp_path / "node", owner_renames_itself=True)
    renamed.add_process("pi5-0", a.pid)
    record = json.loads(renamed.path.read_text())  # type: ignore[union-attr]
    assert record["owner"]["cmdline"] is None
    retitled = {**record, "owner": {**record["owner"], "cmdline": ["ray::NodeLauncher.calibrate"]}}
    stale = state / "run-stale.json"
    stale.write_text(json.dumps(retitled))  # the same owner, recorded with a title it no longer has
    swept = sweep_orphans(state)
    assert [s.processes for s in swept] == [[f"pi5-0 (pid {a.pid})"]]  # the cmdline check bites ...
    assert renamed.path is not None and renamed.path.exists()  # ... and spares the pid + start ledger
    renamed.close()
