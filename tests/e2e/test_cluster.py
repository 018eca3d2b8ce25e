"""Campaigns across a real local Ray cluster (ray.cluster_utils.Cluster: a head and two worker
nodes, each its own raylet, on this host). Required where ORCHARD_REQUIRE_RAY=1 (CI); skipped
with the reason where Ray is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_or_skip
from tests.e2e.test_campaign import CGROUP_ROOT, ROOT, campaign_file, events, processes_of, require_cgroups

FLEET = """
[[fleet]]
name = "pi5"
board = "rpi5"
count = 4
[[fleet]]
name = "orin"
board = "jetson-orin-nano"
count = 4
"""
CLUSTER = '[cluster]\nengine = "ray"\naddress = "auto"\n[throttle]\nreserve_cores = 0.25\n[broker]\nkeepalive_s = 2\n'
SMALL_STORE = 80 * 1024 * 1024  # bytes: the object store carries only configs, shards and logs here


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One cluster for the module (starting one costs ~10 s here); the node-loss test runs last.
    Its runs keep their ledgers in a state dir of their own (the Ray workers inherit it), so no
    other run on the host sweeps what a lost node left before the test looks."""
    require_or_skip("ORCHARD_REQUIRE_RAY", importlib.util.find_spec("ray") is not None,
                    "ray is not installed (pip install 'orchard[cluster]')")
    require_cgroups()
    from ray.cluster_utils import Cluster

    mp = pytest.MonkeyPatch()
    mp.setenv("ORCHARD_RUNS_STATE", str(tmp_path_factory.mktemp("runs-state")))

    # The head offers no CPU, so every device (and simulation worker) lands on the two worker nodes.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": SMALL_STORE,
                                                      "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1, object_store_memory=SMALL_STORE)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()
        mp.undo()


def run_cmd(path: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "testbed.cli", "campaign", "run", str(path), "--out", str(run), "--quiet"]


def env_for(cluster: Any) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": cluster.address}


def left_cgroups(campaign: str) -> list[Path]:
    return [run for controller in ("cpu", "cpuacct", "memory", "freezer", "")
            for run in ((CGROUP_ROOT / controller / "orchard") if controller else CGROUP_ROOT / "orchard").glob(
                f"{campaign}-*")]


def node_processes(campaign: str) -> list[int]:
    """Device processes a node launcher started (their configs live in its work folder)."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if f"orchard-node-{campaign}-" in " ".join(p.info["cmdline"] or [])]


def node_of(run: Path) -> dict[str, str]:
    return {d["id"]: d["node"] for d in json.loads((run / "fleet.json").read_text())["devices"]}


def test_campaign_split_over_two_nodes_has_one_run_folder(tmp_path, cluster):
    path = campaign_file(tmp_path, "cl2", FLEET, rounds=3, duration_board_s=120, extra=CLUSTER)
    run = tmp_path / "run"
    proc = subprocess.run(run_cmd(path, run), cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env=env_for(cluster))
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes = node_of(run)
    assert len(nodes) == 8 and len(set(nodes.values())) == 2
    assert sorted(list(nodes.values()).count(n) for n in set(nodes.values())) == [4, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] >= 3 and summary["updates_accepted"] > 0
    assert {d["id"] for d in summary["devices"]} == set(nodes)
    assert all(d["node"] in nodes.values() for d in summary["devices"])
    assert len(summary["nodes"]) == 2 and summary["nodes_lost"] == []
    # Each node calibrated on its own; the campaign runs at the largest dilation any node needs.
    fleet = json.loads((run / "fleet.json").read_text())
    assert fleet["time_dilation"] == max(n["needed_dilation"] for n in fleet["nodes"])
    assert all(n["dilation"]["factor"] == fleet["time_dilation"] and n["host_speed_factor"] > 0 for n in fleet["nodes"])
    # Every device's telemetry trace and log came back into the one folder.
    for d in nodes:
        assert (run / "devices" / f"{d}.csv").stat().st_size > 100, d
        assert "hello" in (run / "logs" / f"{d}.log").read_text(errors="replace").lower() or \
            (run / "logs" / f"{d}.log").stat().st_size > 0, d
    assert (run / "report.html").stat().st_size > 50_000
    hellos = {e["device"] for e in events(run) if e["event"] == "device_hello"}
    assert hellos == set(nodes)
    assert left_cgroups("cl2") == [] and processes_of(run) == [] and node_processes("cl2") == []


def test_simulate_on_ray_workers_of_the_cluster(tmp_path, cluster):
    from tests.unit.test_simulate import write

    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "simulate", str(write(tmp_path)), "--clients", "30",
                           "--per-round", "3", "--rounds", "3", "--engine", "ray", "--workers", "2",
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=env_for(cluster))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "simulation.json").read_text())["summary"]
    assert summary["engine"] == "ray" and summary["rounds"] == 3 and summary["final_accuracy"] > 0.2


def test_losing_a_node_takes_its_devices_offline_and_the_campaign_finishes(tmp_path, cluster):
    # Stopped by time, not rounds: the four Pi 5s alone would finish a round budget before the
    # broker had handed the server the lost devices' Last Wills.
    path = campaign_file(tmp_path, "cllost", FLEET, rounds=100_000, duration_board_s=6, extra=CLUSTER)
    run = tmp_path / "run"
    proc = subprocess.Popen(run_cmd(path, run), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env_for(cluster))
    try:
        deadline = time.monotonic() + 300
        # Kill a node once every device has said hello and a round was merged.
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "events.jsonl").exists():
                ev = events(run)
                if (len({e["device"] for e in ev if e["event"] == "device_hello"}) == 8
                        and any(e["event"] == "aggregated" for e in ev)):
                    break
            time.sleep(0.5)
        assert proc.poll() is None, "the campaign ended before the node could be killed"
        victim_id = node_of(run)["orin-0"]
        victim = next(n for n in cluster.worker_nodes if n.node_id == victim_id)
        cluster.remove_node(victim, allow_graceful=False)
        killed_at = time.time()
        _, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    lost_devices = sorted(d for d, n in node_of(run).items() if n == victim_id)
    assert lost_devices == [f"orin-{i}" for i in range(4)]
    ev = events(run)
    lost = [e for e in ev if e["event"] == "node_lost"]
    assert len(lost) == 1 and lost[0]["node"] == victim_id and sorted(lost[0]["devices"]) == lost_devices
    # Their Last Will: each went offline after the kill, and none trained again.
    for d in lost_devices:
        assert any(e["event"] == "device_offline" and e["device"] == d and e["wall_t"] >= killed_at - 1
                   for e in ev), d
        assert not any(e["event"] == "update_accepted" and e["device"] == d and e["wall_t"] > lost[0]["wall_t"] + 5
                       for e in ev), d
    merged_after = [e for e in ev if e["event"] == "aggregated" and e["wall_t"] > lost[0]["wall_t"]]
    assert len(merged_after) >= 2, "the campaign did not go on after the node was lost"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["nodes_lost"][0]["node"] == victim_id and summary["nodes_lost"][0]["t_s"] > 0
    assert "CLUSTER NODE LOST" in (run / "report.html").read_text()
    assert processes_of(run) == [] and node_processes("cllost") == []
    # The lost node's devices died with it, its cgroups stayed (as on a host that went away, or
    # a launcher SIGKILLed): the next launcher on this host removes them, and says whose they were.
    assert left_cgroups("cllost"), "the lost node's cgroups should be left behind"
    from testbed.campaign import load_campaign
    from testbed.node import NodeLauncher

    following = NodeLauncher(load_campaign(path), ["orin-0"], 1)
    swept = following.calibrate()["swept"]
    following.stop()
    assert [ln for ln in swept if "left by runner pid" in ln and "stopped" in ln], swept
    assert left_cgroups("cllost") == []
