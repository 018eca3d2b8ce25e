"""Testbed capacity and overhead (issue 4): how many emulated boards this host runs, and what
the harness itself costs.

SCALE. Campaigns of N emulated Raspberry Pi 4 boards (`SCALE_BOARD`) training the smallest model
(mlp on digits, iid, `LOCAL_STEPS` local steps, semi-async K = N/2), each with a fixed wall time
(`SCALE_WALL_S`, the stop rule; rounds = 10^6 so they never stop it), for N in `LADDER`, stopping
after the first N (>= 16) that does not keep up. Per N, from the run folder:
  * telemetry_hz_median: per device, the telemetry rate in the second half of the server's life
    (wall clock [start + T/2, start + T - 1.5 s]; T = the server's own clock at `finished`), from
    the sample timestamps in devices/<id>.csv, which the server writes as it receives them (a
    server that falls behind shows as missing samples at the end). Samples are counted at most one
    per period (see `_rate_hz`: the agent adds samples at task ends; `telemetry_hz_raw_median`
    counts every row). A device not up yet counts 0 for the time it was not. The configured rate is
    1 Hz; the agent schedules each sample 1/hz after the previous one was taken, so ~0.97-0.98 is
    ideal, and one sample more or less in the ~18.5 s window moves a device by ~0.05 Hz (so 1.03
    can show up when task-end samples fill the gaps).
    `telemetry_hz_median_once_up`: the same from 2 s after each device's first sample, and
    `devices_up_by_half`: devices with a sample before the window; together they separate a fleet
    too slow to start within the window from one that cannot hold the rate;
  * telemetry_lag_s_median: how stale the newest sample the server has written is, sampled every
    `LAG_EVERY_S` in the second half (median over ticks of the median over devices). Up to ~2 s
    when keeping up (1 Hz sampling + up to 1 s publish batching);
  * contributed_fraction: devices with at least one update accepted or rejected by the server;
  * aggregations_per_min_2nd_half: server.csv rows with wall_s >= T/2, per minute;
  * startup_s_median: campaign_start -> a device's first telemetry sample;
  * harness CPU share (as OVERHEAD below) and host load: 1-min load average at the end, the host's
    busy fraction over the run (all cores, everyone's work) and the part of it not from this
    campaign (`foreign_busy_fraction`: other engineers' tests, this sampler);
  * memory: peak summed RSS of the device processes (agent + trainer), the peak per device, and the
    lowest MemAvailable seen. A run does not start unless MemAvailable leaves room for N devices at
    `MB_PER_DEVICE_BUDGET`.
A run "keeps up" when it ended without error, telemetry_hz_median >= 0.9, contributed_fraction >=
0.9 and aggregations_per_min_2nd_half > 0. `largest_keeping_up` is the largest such N.

OVERHEAD. The process tree of the `orchard campaign run` subprocess is sampled every `SAMPLE_S`
with psutil; every process (keyed by pid + start time, so reuse is never confused) keeps its last
seen user+system CPU seconds, so processes that exit keep what they used up to their last sample.
Processes are classed: runner (the `orchard campaign run` process itself), server (`-m server`),
broker (`testbed.broker` / amqtt), devices (`-m runtime` and everything it starts, e.g. the spawned
trainer), other (anything else, e.g. a host-speed probe). harness = runner + server + broker.
  * over the campaign's live window (server_start -> server_stop events, cumulative figures
    interpolated between samples): harness_share_of_campaign_cpu = harness CPU / CPU of the whole
    tree, harness_share_of_host = harness CPU / (window x host cores), and the same per class;
  * over the whole command (preparation, the live window, shutdown and report writing), with the
    runner's own CPU split into before / during / after the live window;
  * cross-checks: the device CPU from each device cgroup's cpuacct.usage (sampled, last value per
    group) next to psutil's, and the whole tree's CPU from wait4()'s rusage of the runner (which
    includes every descendant that was reaped: a lower bound, since a trainer orphaned when its
    agent is killed is reaped by init) next to the sampled total.
Reported for campaigns/default.toml (8 boards, CNN, stops at 30 rounds / 0.93 accuracy) and for
the N=16 scale point.

Hygiene: after each run the device cgroups the sampler saw (from /proc/<pid>/cgroup) must be gone,
and no process the runner started may be alive, nor any process with the run folder on its
command line; anything found is reported under `cleanup_problems` (a leftover tree process we
started is killed by pid; anything else is only reported). Run folders: /tmp/bench-testbed/.

Caveat: the host has 2 cores shared with other engineers' concurrent tests, so every figure here
is noisy (see foreign_busy_fraction per run); a ladder point near a threshold can flip between
runs. Benchmarks measure, never assert: a run that errors is reported with its error.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.testbed_figures import fleet_figures
from bench.testbed_sampler import CLASSES, HARNESS, TreeSampler

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("/tmp/bench-testbed")
ORCHARD = ROOT / ".venv" / "bin" / "orchard"
DEFAULT_CAMPAIGN = ROOT / "campaigns" / "default.toml"

LADDER = (8, 16, 32, 48, 64, 96)
OVERHEAD_SCALE_N = 32
SCALE_BOARD = "rpi4b-4gb"
SCALE_MODEL = "lenet"
BOARD_S = 40.0  # [stop] wall_s: board seconds of each ladder point (wall = BOARD_S x dilation + start-up)
LOCAL_STEPS = 1000  # a task spans a few board seconds, so training rows come in runs (delivered CPU)
KEEP_HZ = 0.9
KEEP_DELIVERED = 0.9
KEEP_CONTRIBUTED = 0.9
MB_PER_DEVICE_BUDGET = 200  # ~110 MB measured per device; margin for the trainer's peak
MEM_RESERVE_MB = 2048
SECTION_BUDGET_S = 600.0  # no run starts unless its estimate fits in this
RUN_GRACE_S = 90.0  # past the expected wall time: SIGINT the runner (it cleans up), then SIGKILL what is left
CAVEAT = ("2-core host shared with other engineers' concurrent tests: figures are noisy "
          "(foreign_busy_fraction shows how much of the host others used during each run)")


# ------------------------------------------------------------------------------ campaigns
def scale_toml(n: int, name: str, board_s: float = BOARD_S) -> str:
    # dilation = "auto": the runner slows the campaign by (sum of board quotas) / (what the host can
    # give), so N boards get their quota each; the ladder measures whether they really do.
    return f"""[campaign]
name = "{name}"
seed = 0
description = "testbed bench: {n} x {SCALE_BOARD}, {SCALE_MODEL}, fixed board time, dilated"

[stop]
rounds = 1000000
wall_s = {board_s:g}

[model]
name = "{SCALE_MODEL}"
dataset = "digits"
partition = "iid"

[strategy]
name = "semi-async"
k_fraction = 0.5
max_staleness = 10

[train]
local_steps = {LOCAL_STEPS}

[broker]
kind = "embedded"

[throttle]
backend = "auto"
require = true
dilation = "auto"

[[fleet]]
name = "pi4"
board = "{SCALE_BOARD}"
count = {n}
"""



# ------------------------------------------------------------------------------ one run
def _events(run: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError), (run / "events.jsonl").open() as f:
        for line in f:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 2) if xs else None


def _share(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole > 0 else None


def _cpu_figures(sampler: TreeSampler, a: float, b: float, cores: int) -> dict[str, Any]:
    ca, ha = sampler.at(a)
    cb, hb = sampler.at(b)
    cpu = {k: round(cb[k] - ca[k], 3) for k in CLASSES}
    harness = sum(cpu[k] for k in HARNESS)
    total = sum(cpu.values())
    window = b - a
    host_busy = hb - ha
    return {
        "window_s": round(window, 2), "cpu_s": cpu, "harness_cpu_s": round(harness, 3),
        "campaign_cpu_s": round(total, 3),
        "harness_share_of_campaign_cpu": _share(harness, total),
        "harness_share_of_host": _share(harness, window * cores),
        "share_of_host": {k: _share(v, window * cores) for k, v in cpu.items()},
        "campaign_share_of_host": _share(total, window * cores),
        "host_busy_fraction": _share(host_busy, window * cores),
        "foreign_busy_fraction": _share(max(0.0, host_busy - total), window * cores),
    }


def run_campaign(label: str, config: Path, run: Path, wall_s: float,
                 board_s: float | None = None) -> dict[str, Any]:
    """Run one campaign under the sampler; return its raw figures (never raises for a failed run)."""
    cores = os.cpu_count() or 1
    log_path = run.parent / f"{run.name}.out"
    t0 = time.time()
    me0 = psutil.Process().cpu_times()
    res: dict[str, Any] = {"label": label, "config": str(config), "run": str(run)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(ORCHARD), "campaign", "run", str(config), "--out", str(run), "--force",
                                 "--quiet"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    sampler = TreeSampler(proc.pid, run)
    sampler.start()
    # wall_s is the expected wall time; once fleet.json gives the run's dilation, the deadline
    # follows it (a busier host at launch means a larger dilation, so a longer run).
    deadline = time.monotonic() + wall_s + RUN_GRACE_S
    interrupted = killed = False
    dilated = board_s is None
    rusage = None
    status = 0
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if not dilated and board_s is not None:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                factor = float(json.loads((run / "fleet.json").read_text())["time_dilation"])
                deadline = time.monotonic() + board_s * factor + RUN_GRACE_S
                dilated = True
        if time.monotonic() > deadline and not interrupted:
            interrupted = True  # the runner turns SIGINT into a clean stop
            deadline = time.monotonic() + 40.0
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
        elif time.monotonic() > deadline and not killed:
            killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    t_end = time.time()
    sampler.stop()
    me1 = psutil.Process().cpu_times()
    res.update(returncode=proc.returncode, command_wall_s=round(t_end - t0, 2))
    if interrupted:
        res["timeout"] = f"still running {wall_s + RUN_GRACE_S:.0f} s after start: SIGINT" + (
            ", then SIGKILL" if killed else "")
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:] if log_path.exists() else []
        res["error"] = f"exit {proc.returncode}: " + " | ".join(tail)

    events = _events(run)
    first = {e["event"]: e for e in reversed(events) if "event" in e}
    start_t = first.get("server_start", {}).get("wall_t")
    stop_t = first.get("server_stop", {}).get("wall_t")
    fin = first.get("finished")
    res["stop_reason"] = first.get("campaign_stop", {}).get("reason")

    # ---- CPU: live window and whole command
    res["bench_sampler_cpu_s"] = round((me1.user + me1.system) - (me0.user + me0.system), 3)
    if start_t and stop_t and stop_t > start_t:
        res["live"] = _cpu_figures(sampler, start_t, stop_t, cores)
    whole = _cpu_figures(sampler, t0, t_end, cores)
    ca, _ = sampler.at(start_t or t0)
    cb, _ = sampler.at(stop_t or t_end)
    ce, _ = sampler.at(t_end)
    whole["runner_cpu_s_split"] = {"before_live": round(ca["runner"], 3),
                                   "live": round(cb["runner"] - ca["runner"], 3),
                                   "after_live": round(ce["runner"] - cb["runner"], 3)}
    whole["devices_cpu_s_from_cgroups"] = round(sum(sampler.groups.values()), 3)
    whole["device_groups_seen"] = len(sampler.usage_dirs)
    if rusage is not None:
        whole["tree_cpu_s_from_wait4"] = round(rusage.ru_utime + rusage.ru_stime, 3)
    res["whole_command"] = whole
    res["memory"] = {"peak_devices_rss_mb": round(sampler.peak_devices_rss_mb, 1),
                     "peak_device_rss_mb": round(sampler.peak_device_rss_mb, 1),
                     "min_host_available_mb": round(sampler.min_available_mb)}
    res["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    if sampler.errors:
        res["sampler_errors"] = sorted(set(sampler.errors))[:5]

    # ---- federation figures (board time: server.csv and devices/<id>.csv are stamped in it)
    fleet: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        fleet = json.loads((run / "fleet.json").read_text())
    device_ids = [d["id"] for d in fleet.get("devices", []) if isinstance(d, dict) and "id" in d]
    res["n_devices"] = len(device_ids)
    contributed = {e.get("device") for e in events
                   if e.get("event") == "update_accepted" or str(e.get("event", "")).endswith("_rejected")}
    res["contributed_fraction"] = _share(len(contributed & set(device_ids)), len(device_ids))
    if fin is not None and "t" in fin:
        span = float(fin["t"])
        rows: list[float] = []
        with contextlib.suppress(OSError), (run / "server.csv").open(newline="") as f:
            for r in csv.DictReader(f):
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    rows.append(float(r["t_s"]))
        res["server_board_s"] = round(span, 2)
        res["aggregations"] = len(rows)
        half = [w for w in rows if w >= span / 2]
        res["aggregations_per_board_min_2nd_half"] = round(len(half) / (span / 2) * 60, 1) if span > 0 else None
    res["fleet"] = fleet_figures(run, events, fleet, sampler.usage_series, sampler.newest_ticks)
    res["device_cpu"] = sampler.device_cpu_split()
    res["memory"]["peak_agent_rss_mb_median"] = _median(list(sampler.peak_agent_rss_mb.values()))
    res["memory"]["peak_trainer_rss_mb_median"] = _median(list(sampler.peak_trainer_rss_mb.values()))
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        fidelity = json.loads((run / "summary.json").read_text())["fidelity"]["delivered_cpu"]
        ratios = [float(v["ratio"]) for v in fidelity.values()]
        res["fleet"]["trainer_delivered_cpu"] = {"median": _median(ratios), "min": min(ratios) if ratios else None,
                                                 "devices_measured": len(ratios)}
    res["cleanup_problems"] = _check_clean(sampler, run)
    return res


def _check_clean(sampler: TreeSampler, run: Path) -> list[str]:
    problems = []
    left = sorted({d for d in sampler.all_group_dirs if os.path.isdir(d)})
    if left:
        problems.append(f"cgroups left behind: {', '.join(left[:4])}{' ...' if len(left) > 4 else ''}")
    strays = sampler.alive_tree()
    for p in strays:  # processes of our own tree (pid + start time matched): ours to end
        with contextlib.suppress(psutil.Error):
            problems.append(f"process left running: pid {p.pid} {' '.join(p.cmdline())[:120]} (killed)")
            p.kill()
    ours = {p.pid for p in strays}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if str(run) in cmd and p.pid not in ours and p.pid != os.getpid():
            problems.append(f"process with the run folder in its command line: pid {p.pid} {cmd[:120]} "
                            "(not started by this sampler's tree as far as it saw; left alone)")
    return problems


# ------------------------------------------------------------------------------ reporting
def _broken(r: dict[str, Any]) -> list[str]:
    """The properties a ladder point did not keep (empty: it keeps up)."""
    fleet = r.get("fleet") or {}
    hz, cpu = fleet.get("telemetry_hz_median"), (fleet.get("delivered_cpu") or {}).get("min")
    out = []
    if r.get("returncode") != 0 or "error" in r:
        out.append(f"run failed: {str(r.get('error'))[:160]}")
    if hz is None or hz < KEEP_HZ:
        out.append(f"telemetry median {_fmt(hz, '.3f')} Hz < {KEEP_HZ}")
    if cpu is None or cpu < KEEP_DELIVERED:
        out.append(f"delivered CPU min {_fmt(cpu, '.3f')} < {KEEP_DELIVERED}")
    if (r.get("contributed_fraction") or 0.0) < KEEP_CONTRIBUTED:
        out.append(f"contributed {_fmt(r.get('contributed_fraction'), '.2f')} < {KEEP_CONTRIBUTED}")
    if not (r.get("aggregations_per_board_min_2nd_half") or 0.0) > 0:
        out.append("no aggregation in the 2nd half")
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _overhead_line(label: str, r: dict[str, Any]) -> str:
    live = r.get("live") or {}
    whole = r.get("whole_command") or {}
    cpu = live.get("cpu_s", {})
    parts = ", ".join(f"{k} {_fmt(cpu.get(k), '.1f')}" for k in CLASSES[:4])
    return (f"  overhead {label:<8} live {_fmt(live.get('window_s'), '.1f')} s: harness "
            f"{_fmt(live.get('harness_cpu_s'), '.1f')} CPU-s = "
            f"{_fmt(live.get('harness_share_of_campaign_cpu'), '.1%')} of the campaign's CPU, "
            f"{_fmt(live.get('harness_share_of_host'), '.1%')} of the host ({parts}); "
            f"whole command {_fmt(r.get('command_wall_s'), '.0f')} s: harness "
            f"{_fmt(whole.get('harness_share_of_campaign_cpu'), '.1%')} of {_fmt(whole.get('campaign_cpu_s'), '.1f')}"
            f" CPU-s; host busy {_fmt(live.get('host_busy_fraction'), '.0%')}"
            f" (others {_fmt(live.get('foreign_busy_fraction'), '.0%')})")


def _scale_line(r: dict[str, Any]) -> str:
    live = r.get("live") or {}
    fleet = r.get("fleet") or {}
    cpu = fleet.get("delivered_cpu") or {}
    rss = fleet.get("rss") or {}
    head = f"  fleet N={r['n']:<3}"
    if "error" in r and fleet.get("telemetry_hz_median") is None:
        return f"{head} ERROR {r['error'][:200]}"
    verdict = "keeps up" if not r["broken"] else "does NOT keep up: " + "; ".join(r["broken"])
    return (f"{head} dilation {_fmt(fleet.get('dilation'), '.2f')}"
            f"  telemetry {_fmt(fleet.get('telemetry_hz_median'), '.3f')} Hz board"
            f" (min {_fmt(fleet.get('telemetry_hz_min'), '.2f')},"
            f" lag {_fmt(fleet.get('telemetry_lag_board_s_median'), '.1f')} s)"
            f"  delivered CPU median {_fmt(cpu.get('median'), '.3f')} min {_fmt(cpu.get('min'), '.3f')}"
            f" ({cpu.get('devices_measured')}/{cpu.get('devices')} devices)"
            f"  contributed {_fmt(r.get('contributed_fraction'), '.0%')}"
            f"  startup {_fmt(fleet.get('startup_board_s_median'), '.1f')} board s"
            f"  harness {_fmt(live.get('harness_share_of_campaign_cpu'), '.1%')} of campaign CPU /"
            f" {_fmt(live.get('harness_share_of_host'), '.1%')} of host"
            f"  RSS agent {_fmt(rss.get('agent_mb_median'), '.0f')}"
            f" + trainer {_fmt(rss.get('trainer_mb_median'), '.0f')} MB"
            f"  host busy {_fmt(live.get('host_busy_fraction'), '.0%')}"
            f" (others {_fmt(live.get('foreign_busy_fraction'), '.0%')})"
            f"  load {_fmt(r.get('loadavg_1m_end'), '.1f')}"
            f"  wall {_fmt(r.get('command_wall_s'), '.0f')} s -> {verdict}")


def _estimate_s(n: int, quota_cores: float, capacity_cores: float) -> float:
    """Wall seconds of a ladder point: BOARD_S x the dilation the runner will pick, plus
    preparation, start and shutdown (growing with the fleet)."""
    return BOARD_S * max(1.0, n * quota_cores / capacity_cores) + 20.0 + 0.5 * n


def _quota_and_capacity() -> tuple[float, float]:
    """A SCALE_BOARD's quota on this host and the capacity the runner would plan with now."""
    from runtime.board import load_board
    from testbed.calibrate import board_quota_cores, get_host_speed
    from testbed.dilation import DEFAULT_RESERVE_CORES, MIN_CAPACITY_CORES, background_cores

    cores = os.cpu_count() or 1
    quota = board_quota_cores(load_board(SCALE_BOARD), get_host_speed())
    return quota, max(MIN_CAPACITY_CORES, cores - DEFAULT_RESERVE_CORES - background_cores(cores))


def fleet_point(n: int) -> dict[str, Any]:
    """One ladder point: N devices for BOARD_S board seconds."""
    name = f"tbbench-n{n}"
    config = OUT / f"{name}.toml"
    config.write_text(scale_toml(n, name))
    quota, capacity = _quota_and_capacity()
    try:
        r = run_campaign(f"N={n}", config, OUT / name, wall_s=_estimate_s(n, quota, capacity), board_s=BOARD_S)
    except Exception as exc:  # the bench reports, it does not crash
        r = {"label": f"N={n}", "error": f"{type(exc).__name__}: {exc}"}
    r["n"] = n
    r["broken"] = _broken(r)
    r["keeps_up"] = not r["broken"]
    return r


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    live, fleet = r.get("live") or {}, r.get("fleet") or {}
    cpu, rss = fleet.get("delivered_cpu") or {}, fleet.get("rss") or {}
    return {"n": r.get("n"), "keeps_up": r.get("keeps_up"), "broken": r.get("broken"),
            "dilation": fleet.get("dilation"), "quota_cores_per_device": fleet.get("quota_cores_per_device"),
            "telemetry_hz_board_median": fleet.get("telemetry_hz_median"),
            "telemetry_hz_board_min": fleet.get("telemetry_hz_min"),
            "telemetry_lag_board_s_median": fleet.get("telemetry_lag_board_s_median"),
            "delivered_cpu_median": cpu.get("median"), "delivered_cpu_min": cpu.get("min"),
            "trainer_delivered_cpu_median": (fleet.get("trainer_delivered_cpu") or {}).get("median"),
            "contributed_fraction": r.get("contributed_fraction"),
            "aggregations_per_board_min_2nd_half": r.get("aggregations_per_board_min_2nd_half"),
            "startup_board_s_median": fleet.get("startup_board_s_median"),
            "harness_share_of_campaign_cpu": live.get("harness_share_of_campaign_cpu"),
            "harness_share_of_host": live.get("harness_share_of_host"),
            "share_of_host": live.get("share_of_host"),
            "rss_agent_mb_median": rss.get("agent_mb_median"), "rss_trainer_mb_median": rss.get("trainer_mb_median"),
            "rss_device_mb_max": rss.get("device_mb_max"),
            "host_busy_fraction": live.get("host_busy_fraction"),
            "foreign_busy_fraction": live.get("foreign_busy_fraction"),
            "device_cpu": r.get("device_cpu"),
            "loadavg_1m_end": r.get("loadavg_1m_end"), "command_wall_s": r.get("command_wall_s")}


def run() -> dict[str, Any]:
    t_section = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    out: dict[str, Any] = {
        "caveat": CAVEAT,
        "host": {"cores": cores, "mem_total_mb": round(psutil.virtual_memory().total / 2**20)},
        "setup": {"ladder": list(LADDER), "board": SCALE_BOARD, "model": SCALE_MODEL, "dataset": "digits",
                  "local_steps": LOCAL_STEPS, "strategy": "semi-async k_fraction=0.5", "board_s": BOARD_S,
                  "dilation": "auto", "telemetry_hz_board_configured": 1.0,
                  "keeps_up_when": f"no error, telemetry_hz_board_median >= {KEEP_HZ}, delivered_cpu_min >= "
                                   f"{KEEP_DELIVERED}, contributed_fraction >= {KEEP_CONTRIBUTED}, "
                                   "aggregations in the 2nd half"},
    }
    problems: list[str] = []

    # ---- OVERHEAD on the default campaign
    try:
        r = run_campaign("default", DEFAULT_CAMPAIGN, OUT / "default", wall_s=100.0)
    except Exception as exc:  # the bench reports, it does not crash
        r = {"label": "default", "error": f"{type(exc).__name__}: {exc}"}
    problems += [f"default: {p}" for p in r.get("cleanup_problems", [])]
    print(_overhead_line("default", r) + (f"  [{r['error'][:160]}]" if "error" in r else ""), flush=True)
    overhead: dict[str, Any] = {"default": r}

    # ---- FLEET ladder
    rows: list[dict[str, Any]] = []
    stopped = "ladder done"
    quota, _ = _quota_and_capacity()
    for n in LADDER:
        spent = time.monotonic() - t_section
        # Planned with the quiet host's capacity: the lead's rerun is the one the budget is for.
        estimate = _estimate_s(n, quota, cores - 0.5)
        if spent + estimate > SECTION_BUDGET_S:
            stopped = (f"time budget: N={n} (~{estimate:.0f} s) would end past {SECTION_BUDGET_S:.0f} s"
                       f" (spent {spent:.0f} s)")
            break
        need = n * MB_PER_DEVICE_BUDGET + MEM_RESERVE_MB
        avail = psutil.virtual_memory().available / 2**20
        if avail < need:
            stopped = f"memory: N={n} needs ~{need} MB, {avail:.0f} MB available"
            break
        r = fleet_point(n)
        rows.append(r)
        problems += [f"N={n}: {p}" for p in r.get("cleanup_problems", [])]
        print(_scale_line(r), flush=True)
        if n == OVERHEAD_SCALE_N:
            overhead[f"n{n}"] = r
            print(_overhead_line(f"N={n}", r), flush=True)
        if not r["keeps_up"] and n >= OVERHEAD_SCALE_N:
            stopped = f"N={n} did not keep up: {'; '.join(r['broken'])}"
            break
    keeping = [r["n"] for r in rows if r["keeps_up"]]
    largest = max(keeping) if keeping else None
    first_fail = next((r for r in rows if not r["keeps_up"]), None)
    print(f"  fleet: largest N keeping up = {largest} ({stopped}); {CAVEAT}", flush=True)
    out["fleet"] = {"table": [_brief(r) for r in rows], "largest_keeping_up": largest,
                    "first_failing": None if first_fail is None else {"n": first_fail["n"],
                                                                       "broken": first_fail["broken"]},
                    "stopped": stopped, "section_wall_s": round(time.monotonic() - t_section, 1), "runs": rows}
    out["overhead"] = {k: {"live": v.get("live"), "whole_command": v.get("whole_command"),
                           "error": v.get("error"), "command_wall_s": v.get("command_wall_s"),
                           "stop_reason": v.get("stop_reason")} for k, v in overhead.items()}
    out["overhead"]["default_run"] = overhead["default"]
    out["cleanup_problems"] = problems
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if len(sys.argv) > 1:  # `python bench/testbed_bench.py 32 [48 ...]`: single ladder points, for A/B runs
        OUT.mkdir(parents=True, exist_ok=True)
        for arg in sys.argv[1:]:
            r = fleet_point(int(arg))
            print(_scale_line(r), flush=True)
            print(json.dumps({"brief": _brief(r), "run": r}, indent=1, default=str))
    else:
        print(json.dumps(run(), indent=1))
