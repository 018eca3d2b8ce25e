"""Campaigns end to end: real broker, server, device processes, cgroups, traces and reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import tomllib

from tests.conftest import require_or_skip

ROOT = Path(__file__).resolve().parents[2]
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroups_writable() -> bool:
    probe = CGROUP_ROOT / "cpu" / "orchard-probe"
    try:
        probe.mkdir(exist_ok=True)
        probe.rmdir()
        return True
    except OSError:
        return (CGROUP_ROOT / "cgroup.controllers").exists() and os.access(CGROUP_ROOT, os.W_OK)


def require_cgroups() -> None:
    require_or_skip("ORCHARD_REQUIRE_CGROUPS", cgroups_writable(), "cgroups are not writable here (needs root)")


@pytest.fixture
def cgroups() -> None:
    require_cgroups()


def orchard(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def campaign_file(tmp: Path, name: str, fleet: str, *, strategy: str = "semi-async", rounds: int = 4,
                  duration_board_s: float = 60, model: str = "lenet", extra: str = "") -> Path:
    text = f"""
[campaign]
name = "{name}"
seed = 1
[stop]
rounds = {rounds}
duration_board_s = {duration_board_s}
[model]
name = "{model}"
dataset = "digits"
partition = "dirichlet:1.0"
[strategy]
name = "{strategy}"
[train]
local_steps = 10
lr = 0.1
{extra}
{fleet}
"""
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


SMALL_FLEET = """
[[fleet]]
name = "pi5"
board = "rpi5"
count = 2
[[fleet]]
name = "orin"
board = "jetson-orin-nano"
count = 1
"""


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]


def orchard_cgroups_left(campaign: str, before: frozenset[str] = frozenset()) -> list[str]:
    """Groups of runs of `campaign` (run ids are `<campaign>-<random>`) still present, except
    those in `before`: another checkout's run of the same campaign on this host is not ours."""
    left: list[str] = []
    for controller in ("cpu", "cpuacct", "memory", "freezer", ""):
        base = CGROUP_ROOT / controller / "orchard" if controller else CGROUP_ROOT / "orchard"
        if base.is_dir():
            left += [str(p) for run in base.glob(f"{campaign}-*") for p in [run, *run.rglob("*")] if p.is_dir()]
    return [g for g in left if g not in before]


def processes_of(run: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(run) in cmd:
            out.append(p)
    return out


# ----------------------------------------------------------------- bad input, before anything runs
@pytest.mark.parametrize(
    "fleet, extra, needle",
    [
        ('[[fleet]]\nname = "x"\nboard = "rpi9"\n', "", "rpi9"),
        ('[[fleet]]\nname = "x"\nboard = "rpi5"\ncores = 4\n', "", "unknown key 'cores'"),
        ('[[fleet]]\nname = "x"\nboard = "rpi5"\ncpu = { kind = "constant", value = 1.5 }\n', "", "1.5"),
        ('[[fleet]]\nname = "x"\nboard = "rpi5"\ncpu = { kind = "constant", value = 0 }\n', "", "value"),
        ('[[fleet]]\nname = "x"\nboard = "rpi5"\navailability = { kind = "markov", mean_on_s = -1, mean_off_s = 2 }\n',
         "", "mean_on_s"),
        ('[[fleet]]\nname = "x"\nboard = "rpi5"\nprofile = "width=2"\n', "", "width 2.0"),
        ('[[fleet]]\nname = "x"\nboard = "rpi5"\nbandwidth_mbit = 5.0\n', "", "unknown key 'bandwidth_mbit'"),
        ('[[fleet]]\nname = "x"\nboard = "rpi5"\nlink = { kind = "5g" }\n', "", "link kind '5g' is unknown"),
        ('[[fleet]]\nname = "x"\nboard = "rpi5"\nlink = { up_mbit = -2, down_mbit = 1 }\n', "", "up_mbit = -2"),
        (SMALL_FLEET, '[broker]\nkind = "carrier-pigeon"\n', "carrier-pigeon"),
    ],
)
def test_bad_campaign_is_one_clear_line(tmp_path, fleet, extra, needle):
    path = campaign_file(tmp_path, "bad", fleet, extra=extra)
    proc = orchard("campaign", "run", str(path), "--out", str(tmp_path / "run"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and needle in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_unknown_strategy_and_overlapping_trace_file(tmp_path):
    bad_strategy = campaign_file(tmp_path, "s", SMALL_FLEET, strategy="fedmagic")
    proc = orchard("campaign", "run", str(bad_strategy), "--out", str(tmp_path / "r1"))
    assert proc.returncode != 0 and "fedmagic" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "avail.json").write_text(json.dumps({"active": [[0, 10], [5, 20]]}))
    fleet = '[[fleet]]\nname = "x"\nboard = "rpi5"\navailability = { kind = "file", path = "avail.json" }\n'
    overlapping = campaign_file(tmp_path, "o", fleet)
    proc = orchard("campaign", "run", str(overlapping), "--out", str(tmp_path / "r2"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "overlap" in lines[0], proc.stderr


def test_existing_run_folder_is_refused_without_force(tmp_path):
    path = campaign_file(tmp_path, "exists", SMALL_FLEET)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("precious")
    proc = orchard("campaign", "run", str(path), "--out", str(tmp_path / "run"))
    assert proc.returncode != 0 and "--force" in proc.stderr
    assert (tmp_path / "run" / "keep.txt").read_text() == "precious"


def test_campaign_requiring_cgroups_on_a_host_without_them(tmp_path):
    path = campaign_file(tmp_path, "needs", SMALL_FLEET, rounds=2, extra="[throttle]\nrequire = true\n")
    no_cgroups = {"ORCHARD_CGROUP_ROOT": str(tmp_path / "no-cgroupfs")}
    proc = orchard("campaign", "run", str(path), "--out", str(tmp_path / "run"), env=no_cgroups)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "--no-throttle" in lines[0], proc.stderr
    # With --no-throttle it runs, and the report says loudly that nothing was throttled.
    proc = orchard("campaign", "run", str(path), "--out", str(tmp_path / "run"), "--no-throttle", "--quiet",
                   env=no_cgroups)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fleet = json.loads((tmp_path / "run" / "fleet.json").read_text())
    assert fleet["throttle_backend"] == "none" and "THROTTLING DISABLED" in fleet["throttle_warning"]
    assert "THROTTLING DISABLED" in (tmp_path / "run" / "report.html").read_text()


# ----------------------------------------------------------------- real campaigns
def test_default_campaign_leaves_a_complete_run_folder(default_run):
    run, proc, before = default_run.run, default_run.proc, default_run.cgroups_before
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("campaign", "strategy", "duration_board_s", "rounds", "final_accuracy", "best_accuracy",
                "time_to_target_s", "updates_accepted", "updates_rejected", "utilization", "devices"):
        assert key in summary, key
    assert summary["best_accuracy"] > 0.8 and summary["updates_accepted"] > 0
    if str(summary["stop_reason"]).startswith("target accuracy"):
        # The server stopped at the version that got there: no later merge replaced it.
        assert summary["final_accuracy"] >= 0.93, summary
    assert len(summary["devices"]) == 8
    for d in summary["devices"]:
        for key in ("id", "board", "profiles", "train_s", "idle_s", "offline_s", "peak_rss_mb", "energy_j",
                    "energy_source", "oom_count", "updates"):
            assert key in d, (d["id"], key)
    assert {d["board"] for d in summary["devices"]} >= {"rpi4b-4gb", "rpi5", "jetson-orin-nano"}
    for plot in ("accuracy", "timeline", "cpu", "memory", "energy", "staleness"):
        assert (run / "plots" / f"{plot}.png").stat().st_size > 5000
    assert (run / "report.html").stat().st_size > 50_000
    # Under dilation every time constant an agent applies itself is board time x delta, its idle
    # poll included: at 50 ms wall its wakes would eat delta times more of the dilated quota.
    dilation = json.loads((run / "fleet.json").read_text())["time_dilation"]
    for d in summary["devices"]:
        device = tomllib.loads((run / "configs" / f"{d['id']}.toml").read_text())["device"]
        assert device["poll_s"] == pytest.approx(0.05 * dilation) and device["telemetry_hz"] == pytest.approx(
            1 / dilation), d["id"]
        assert device["trainer_start_timeout_s"] == pytest.approx(60 * dilation), d["id"]
    assert orchard_cgroups_left("default", before) == [] and processes_of(run) == []


def test_memory_cap_below_need_records_oom_and_finishes(tmp_path, cgroups):
    fleet = SMALL_FLEET + """
[[fleet]]
name = "tiny"
board = "rpi5"
count = 1
mem_limit_mb = 110
profiles = ["dense", "width=0.25"]
"""
    # What the cap counts is anonymous memory (shared-library pages are page cache, reclaimed before
    # an OOM kill): the dense CNN on 3x32x32 inputs peaks at ~131 MB RSS in the trainer, 97 MB of it
    # anonymous, its width-0.25 submodel at ~76 MB (41 MB anonymous); the agent at ~45 MB RSS. Under a
    # 110 MB cap both start, the dense trainer is OOM-killed once it trains, and the server moves the
    # device to the width-0.25 profile it also offers. (140 MB held the dense trainer once the agent
    # stopped importing numpy before its first task and the trainer lost its resource tracker.)
    synthetic = '[model]\nname = "cnn"\ndataset = "synthetic"\nsamples = 600\ninput_shape = [3, 32, 32]\n'
    path = campaign_file(tmp_path, "oom", fleet, rounds=8, model="cnn")
    path.write_text(path.read_text().replace('[model]\nname = "cnn"\ndataset = "digits"\n', synthetic))
    run = tmp_path / "run"
    before = frozenset(orchard_cgroups_left("oom"))
    proc = orchard("campaign", "run", str(path), "--out", str(run), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = events(run)
    ooms = [e for e in ev if e["event"] == "oom"]
    assert ooms and all(e["device"] == "tiny-0" for e in ooms)
    failed = [e for e in ev if e["event"] == "device_status" and e["device"] == "tiny-0" and e["state"] == "failed"]
    assert failed and "SIGKILL" in failed[0]["detail"]
    down = [e for e in ev if e["event"] == "profile_downgraded" and e["device"] == "tiny-0"]
    assert down and down[0]["to"] == "width=0.25", down
    later = [e for e in ev if e["event"] == "update_accepted" and e["device"] == "tiny-0"
             and e["wall_t"] > down[0]["wall_t"]]
    assert later, "the device never contributed after moving to the smaller profile"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] >= 8
    tiny = next(d for d in summary["devices"] if d["id"] == "tiny-0")
    assert tiny["oom_count"] >= 1
    assert orchard_cgroups_left("oom", before) == []


def test_on_off_availability_shows_offline_last_will_and_rejoin(tmp_path, cgroups):
    fleet = SMALL_FLEET + """
[[fleet]]
name = "flaky"
board = "rpi4b-4gb"
count = 1
availability = { kind = "markov", mean_on_s = 4, mean_off_s = 8, start = "on", seed = 4 }
"""
    # Stopped by board time. This seed's trace (device seed 1 + 3 mixed with 4) is on for 6.0 s,
    # off until 16.7 s and on again until 20.2 s: an outage well after the hello, long past the
    # 3 s a 2 s keepalive takes to declare it, and a rejoin with time for a task after it.
    path = campaign_file(tmp_path, "onoff", fleet, rounds=100_000, duration_board_s=23,
                         extra="[broker]\nkeepalive_s = 2\n")
    run = tmp_path / "run"
    proc = orchard("campaign", "run", str(path), "--out", str(run), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = events(run)
    hello = min(e["wall_t"] for e in ev if e["event"] == "device_hello" and e["device"] == "flaky-0")
    went_off = [e for e in ev if e["event"] == "availability" and e["device"] == "flaky-0" and not e["online"]
                and e["wall_t"] > hello]
    assert went_off, "the trace never switched the device off after it connected"
    t_off = went_off[0]["wall_t"]
    # The broker fired the Last Will: the server saw the device go offline without a goodbye.
    lwt = [e for e in ev if e["event"] == "device_status" and e["device"] == "flaky-0" and e["state"] == "offline"
           and e["wall_t"] > t_off]
    assert lwt and lwt[0]["detail"] == "connection lost"
    assert any(e["event"] == "device_offline" and e["device"] == "flaky-0" for e in ev)
    rejoined = [e for e in ev if e["event"] == "device_hello" and e["device"] == "flaky-0" and e["wall_t"] > t_off]
    assert rejoined, "the device did not say hello again after coming back"
    assert any(e["event"] == "task_sent" and e["device"] == "flaky-0" and e["wall_t"] > rejoined[0]["wall_t"]
               for e in ev), "no work for the device after it rejoined"
    summary = json.loads((run / "summary.json").read_text())
    flaky = next(d for d in summary["devices"] if d["id"] == "flaky-0")
    assert flaky["offline_s"] > 1.0


def test_compare_sync_and_semi_async_runs_of_the_same_fleet(tmp_path, cgroups):
    runs = []
    for strategy in ("fedavg", "semi-async"):
        path = campaign_file(tmp_path, f"cmp-{strategy}", SMALL_FLEET, strategy=strategy, rounds=3)
        run = tmp_path / strategy
        proc = orchard("campaign", "run", str(path), "--out", str(run), "--quiet")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(run)
    out = tmp_path / "cmp"
    proc = orchard("campaign", "compare", *map(str, runs), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "compare_accuracy.png").stat().st_size > 5000
    table = (out / "compare.md").read_text()
    assert "fedavg" in table and "semi-async" in table


def test_ctrl_c_cleans_up_and_reports_what_ran(tmp_path, cgroups):
    path = campaign_file(tmp_path, "ctrlc", SMALL_FLEET, rounds=500, duration_board_s=300)
    run = tmp_path / "run"
    before = frozenset(orchard_cgroups_left("ctrlc"))
    # A suite started in the background by a shell without job control ignores SIGINT, and children
    # inherit that (Python then installs no KeyboardInterrupt handler): give the runner the default.
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "campaign", "run", str(path), "--out", str(run),
                             "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if (run / "events.jsonl").exists() and '"aggregated"' in (run / "events.jsonl").read_text():
                break
            time.sleep(0.5)
        else:
            pytest.fail("campaign never aggregated")
        assert orchard_cgroups_left("ctrlc", before), "devices should be in cgroups while running"
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, proc.stderr
    assert (run / "report.html").exists() and json.loads((run / "summary.json").read_text())["rounds"] >= 1
    assert orchard_cgroups_left("ctrlc", before) == []
    assert processes_of(run) == []
