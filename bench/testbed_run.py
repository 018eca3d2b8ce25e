"""One campaign under the process-tree sampler, for the testbed bench (bench/testbed_bench.py
describes every figure): CPU per process class over the live window and the whole command,
memory, federation figures in board time (bench/testbed_figures.py), and the clean-up check."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from bench.testbed_figures import fleet_figures
from bench.testbed_sampler import CLASSES, HARNESS, TreeSampler

ROOT = Path(__file__).resolve().parents[1]
ORCHARD = ROOT / ".venv" / "bin" / "orchard"
# Past the expected wall time: SIGINT the runner (it cleans up), then SIGKILL what is left. The
# report's plots alone took > 95 s at load 27, so 90 s killed finished runs.
RUN_GRACE_S = 300.0
REPORT_GRACE_S = 900.0  # more, once the report's plots have started (at load 36 they outlasted the grace)


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
    wa, wb = sampler.wait_at(a), sampler.wait_at(b)
    wait = {k: round(wb[k] - wa[k], 3) for k in HARNESS}
    return {
        "window_s": round(window, 2), "cpu_s": cpu, "harness_cpu_s": round(harness, 3),
        "campaign_cpu_s": round(total, 3),
        "harness_share_of_campaign_cpu": _share(harness, total),
        "harness_share_of_host": _share(harness, window * cores),
        "share_of_host": {k: _share(v, window * cores) for k, v in cpu.items()},
        "campaign_share_of_host": _share(total, window * cores),
        "host_busy_fraction": _share(host_busy, window * cores),
        "foreign_busy_fraction": _share(max(0.0, host_busy - total), window * cores),
        # Seconds runnable but waiting for a CPU, per second of CPU used: ~0 when the harness is
        # served at once, >> 1 when it queues behind the devices or other tenants.
        "runqueue_wait_s": wait,
        "runqueue_wait_per_cpu_s": {k: _share(wait[k], cpu[k]) for k in HARNESS},
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
    interrupted = killed = reporting = False
    dilated = board_s is None
    rusage = None
    status = 0
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if not dilated and board_s is not None:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                if (run / "fleet.json").stat().st_mtime < t0:  # the last run's, until --force clears it
                    raise ValueError("stale fleet.json")
                factor = float(json.loads((run / "fleet.json").read_text())["time_dilation"])
                deadline = time.monotonic() + board_s * factor + RUN_GRACE_S
                dilated = True
        if time.monotonic() > deadline and not interrupted and not reporting and (run / "plots").is_dir():
            reporting = True  # the campaign is over and its report is being drawn: let it finish
            deadline = time.monotonic() + REPORT_GRACE_S
        elif time.monotonic() > deadline and not interrupted:
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
    with contextlib.suppress(OSError):  # kept with the run, so its figures can be worked out again
        (run / "bench_usage.json").write_text(json.dumps(sampler.usage_series))
    res["device_cpu"] = sampler.device_cpu_split()
    res["memory"]["peak_agent_rss_mb_median"] = _median(list(sampler.peak_agent_rss_mb.values()))
    res["memory"]["peak_trainer_rss_mb_median"] = _median(list(sampler.peak_trainer_rss_mb.values()))
    res["memory"]["peak_tracker_rss_mb_median"] = _median(list(sampler.peak_tracker_rss_mb.values()))
    res["memory"]["device_processes"] = len(sampler.agent_keys) + len(sampler.trainer_keys)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        fidelity = json.loads((run / "summary.json").read_text())["fidelity"]["delivered_cpu"]
        ratios = [float(v["ratio"]) for v in fidelity.values()]
        res["fleet"]["trainer_delivered_cpu"] = {"median": _median(ratios), "min": min(ratios) if ratios else None,
                                                 "devices_measured": len(ratios)}
    res["harness_cgroups"] = sampler.harness_groups  # {"server": ["harness"], ...}; absent: root group
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
