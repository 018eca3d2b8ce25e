"""Testbed capacity and overhead (issue 16 part 7): how many emulated boards this host runs
faithfully under time dilation, and what the harness itself costs.

FLEET. Campaigns of N emulated Raspberry Pi 4 boards (`SCALE_BOARD`) training LeNet-5 on digits
(iid, `LOCAL_STEPS` local steps, semi-async K = N/2) for `BOARD_S` board seconds ([stop] duration_board_s;
rounds = 10^6 never stop it), with [throttle] dilation = "auto" and require = true: the runner
slows the campaign by delta = (sum of board quotas) / (host cores - 0.5 reserved - other tenants'
use at launch), so each device's cgroup quota is its board's / delta (= capacity / N for one board
kind) and a run of BOARD_S board seconds takes BOARD_S x delta wall seconds. `make bench` runs the
fixed ladder `FIXED_LADDER` (N = 32: with the default campaign ~3 min on a quiet host). With
ORCHARD_BENCH_TESTBED_MAX_N set (e.g. 256) it searches instead: N starts at `START_N` (32), doubles
while it keeps up (up to that N) and then halves the gap to the smallest N that did not, down to
`SEARCH_STEP` (or halves towards `MIN_N` when 32 fails); `fleet.mode` and `fleet.ran_n` say which
ran. A point does not start when host memory cannot hold it. Per N (figures from
bench/testbed_figures.py, all in board time; verdicts and table rows: bench/testbed_report.py):
  * telemetry_hz_board_median / _min: per device, samples at least one board period apart per
    board second, over [w0, w1]: from 2 board s after the last device's first sample (at latest
    the middle of the run; devices not up by then count 0 until they are) to 1.5 board s before
    the server's end. Configured: 1 Hz of board time (the runner gives agents 1/delta Hz of wall
    time); ~0.97-0.98 is ideal (the agent schedules on a fixed grid);
  * delivered_cpu_median / _min: per device, the cgroup's CPU (cpuacct.usage, sampled every
    0.5 s wall) over quota x wall time, summed over the spans the device spent training by its own
    clock (`device_status` "training" to its next status). Why this definition: the quota caps the
    whole cgroup (agent + trainer) and a training trainer always wants more than it, so anything
    below 1 is CPU the host did not give (other devices, the harness, other tenants); a device
    waiting for its next task wants none, so that wait is not owed (until stop 21 it was, whenever
    a task ended between two telemetry rows). `trainer_delivered_cpu_median` is the report's own
    check (summary.json fidelity: the trainer's CPU over its steps / (train time x quota)); it is
    lower by what the agent used inside the same quota while the trainer trained;
  * between_tasks: the wait from a task's end to the device's next training (board s), the share
    of a device's life it trained, and the wall s from a receipt to the next task frame (under
    semi-async mostly the wait for the round to close at K updates);
  * device_cpu: CPU seconds of all agents and all trainers over the run (psutil): the agents'
    share of a device's CPU is overhead a real board pays in proportion to delta times less;
  * RSS: agent and trainer as the devices report them (median over devices of each device's
    median), and the bench's own peak per process kind (agent, trainer, multiprocessing's
    resource tracker: every process a device keeps);
  * harness CPU share (as OVERHEAD below), contributed_fraction, aggregations per board minute in
    the 2nd half, start-up (board s from the campaign start to a device's first sample), host load:
    1-min load average at the end, host busy fraction over the live window and the part of it not
    from this campaign (`foreign_busy_fraction`).
A point keeps up when it ended without error, telemetry_hz_board_median >= 0.9, delivered_cpu_min
>= 0.9 (every device), contributed_fraction >= 0.9, an aggregation happened in the 2nd half and
every cgroup held the quota the dilation planned (within 5 %);
`largest_keeping_up` is the largest such N, `first_failing` names the first N that did not and
which property broke. `python bench/testbed_bench.py 32 48` runs single points (A/B runs).

CFS. Before any fleet, bench/testbed_cfs.py probes the kernel mechanics under the fleet: whether
one cgroup at a Pi 4's dilated quota (0.012-0.05 core) with the testbed's period gets its quota,
and how long a server-shaped process waits for a CPU next to saturated device groups, in the root
group or in the run's harness group (its docstring defines both).

OVERHEAD. The process tree of the `orchard campaign run` subprocess is sampled every `SAMPLE_S`
with psutil; every process (keyed by pid + start time, so reuse is never confused) keeps its last
seen user+system CPU seconds, so processes that exit keep what they used up to their last sample.
Processes are classed: runner (the `orchard campaign run` process itself), server (`-m server`),
broker (`testbed.broker` / amqtt), devices (`-m runtime` and everything it starts, e.g. the spawned
trainer), other (anything else, e.g. a host-speed probe). harness = runner + server + broker.
  * over the campaign's live window (server_start -> server_stop events, cumulative figures
    interpolated between samples): harness_share_of_campaign_cpu = harness CPU / CPU of the whole
    tree, harness_share_of_host = harness CPU / (window x host cores), and the same per class;
    runqueue_wait_s / runqueue_wait_per_cpu_s per harness class: seconds its processes' main
    threads waited runnable for a CPU (/proc/<pid>/schedstat), and that per CPU second they used;
  * over the whole command (preparation, the live window, shutdown and report writing), with the
    runner's own CPU split into before / during / after the live window;
  * cross-checks: the device CPU from each device cgroup's cpuacct.usage (sampled, last value per
    group) next to psutil's, and the whole tree's CPU from wait4()'s rusage of the runner (which
    includes every descendant that was reaped: a lower bound, since a trainer orphaned when its
    agent is killed is reaped by init) next to the sampled total.
Reported for campaigns/default.toml (8 boards, CNN, stops at 30 rounds / 0.93 accuracy) and for
the N=32 (`START_N`) fleet point.

Hygiene: after each run the device cgroups the sampler saw (from /proc/<pid>/cgroup) must be gone,
and no process the runner started may be alive, nor any process with the run folder on its
command line; anything found is reported under `cleanup_problems` (a leftover tree process we
started is killed by pid; anything else is only reported). Run folders: /tmp/bench-testbed/.

Caveat: the host has 2 cores shared with other engineers' concurrent tests, so every figure here
is noisy (see foreign_busy_fraction per run); a ladder point near a threshold can flip between
runs. Benchmarks measure, never assert: a run that errors is reported with its error.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/testbed_bench.py 32`

from bench.testbed_cfs import run as cfs_probes
from bench.testbed_report import (
    KEEP_CONTRIBUTED,
    KEEP_DELIVERED,
    KEEP_HZ,
    KEEP_QUOTA_TOLERANCE,
    _brief,
    _broken,
    _overhead_line,
    _scale_line,
)
from bench.testbed_run import run_campaign

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("/tmp/bench-testbed")
DEFAULT_CAMPAIGN = ROOT / "campaigns" / "default.toml"

START_N = 32  # the target; the search doubles from here, or halves towards MIN_N
MIN_N = 8
SEARCH_STEP = 8  # the search stops when the largest good and smallest bad N are this close
# `make bench` runs the fixed ladder (START_N only: ~3 min with the default campaign on a quiet
# host); ORCHARD_BENCH_TESTBED_MAX_N=256 runs the search up to that N instead (~1 h at 128).
MAX_N_ENV = "ORCHARD_BENCH_TESTBED_MAX_N"
FIXED_LADDER = (START_N,)
SCALE_BOARD = "rpi4b-4gb"
SCALE_MODEL = "lenet"
BOARD_S = 30.0  # [stop] duration_board_s: board seconds of each ladder point (wall = BOARD_S x dilation + start-up)
LOCAL_STEPS = 1000  # a task spans a few board seconds, so training rows come in runs (delivered CPU)
MB_PER_DEVICE_BUDGET = 130  # peak RSS 126 MB a device at N = 128 (an upper bound: shared pages count in each)
MEM_RESERVE_MB = 2048
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
duration_board_s = {board_s:g}

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


def _next_n(good: int, bad: int | None, max_n: int) -> int | None:
    """The next fleet size to try: double past the largest that kept up (up to max_n), or halve the
    gap to the smallest that did not, until the gap is within SEARCH_STEP."""
    if bad is None:
        return 2 * good if 2 * good <= max_n else None
    if good == 0:
        return bad // 2 if bad // 2 >= MIN_N else None
    mid = (good + bad) // 2 // SEARCH_STEP * SEARCH_STEP
    return mid if good < mid < bad else None


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


def runner_poll_cost(reps: int = 7, calls: int = 300) -> dict[str, Any]:
    """CPU per device per runner loop for its OOM check, before (group.stats(): every counter, the
    pid lists) and after (group.oom_kills(): one file), on a real cgroup, interleaved, median over
    `reps` of `calls` calls each (process_time)."""
    from testbed.throttle import detect_throttle

    try:
        throttle = detect_throttle(prefix="orchard", run_id=f"tbbench-poll-{os.getpid()}", required=True)
    except Exception as exc:  # no writable cgroups: nothing to measure
        return {"error": f"{type(exc).__name__}: {exc}"}
    try:
        group = throttle.create("probe", 0.1, 256)
        stats_us, oom_us = [], []
        for _ in range(reps):
            for fn, out in ((group.stats, stats_us), (group.oom_kills, oom_us)):
                c0 = time.process_time()
                for _ in range(calls):
                    fn()
                out.append((time.process_time() - c0) / calls * 1e6)
    finally:
        throttle.close()
    before, after = statistics.median(stats_us), statistics.median(oom_us)
    return {"backend": throttle.backend, "stats_us_per_device_loop": round(before, 1),
            "oom_kills_us_per_device_loop": round(after, 1), "ratio": round(before / after, 1),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def run() -> dict[str, Any]:
    t_section = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    out: dict[str, Any] = {
        "caveat": CAVEAT,
        "host": {"cores": cores, "mem_total_mb": round(psutil.virtual_memory().total / 2**20)},
        "setup": {"start_n": START_N, "search_step": SEARCH_STEP, "fixed_ladder": list(FIXED_LADDER),
                  "board": SCALE_BOARD, "model": SCALE_MODEL,
                  "dataset": "digits",
                  "local_steps": LOCAL_STEPS, "strategy": "semi-async k_fraction=0.5", "board_s": BOARD_S,
                  "dilation": "auto", "telemetry_hz_board_configured": 1.0,
                  "keeps_up_when": f"no error, telemetry_hz_board_median >= {KEEP_HZ}, delivered_cpu_min >= "
                                   f"{KEEP_DELIVERED}, contributed_fraction >= {KEEP_CONTRIBUTED}, "
                                   "aggregations in the 2nd half, enforced quota within "
                                   f"{KEEP_QUOTA_TOLERANCE:.0%} of the planned one"},
    }
    problems: list[str] = []
    out["runner_poll"] = runner_poll_cost()
    print(f"  runner OOM poll per device per loop: {out['runner_poll']}", flush=True)
    out["cfs"] = cfs_probes()
    print(f"  CFS probes: {json.dumps(out['cfs'])}", flush=True)

    # ---- OVERHEAD on the default campaign
    try:
        r = run_campaign("default", DEFAULT_CAMPAIGN, OUT / "default", wall_s=100.0)
    except Exception as exc:  # the bench reports, it does not crash
        r = {"label": "default", "error": f"{type(exc).__name__}: {exc}"}
    problems += [f"default: {p}" for p in r.get("cleanup_problems", [])]
    print(_overhead_line("default", r) + (f"  [{r['error'][:160]}]" if "error" in r else ""), flush=True)
    overhead: dict[str, Any] = {"default": r}

    # ---- FLEET: the fixed ladder, or (MAX_N_ENV set) the search from N = START_N, doubling while
    # it keeps up, then halving the gap to the first N that does not (down to 8 when START_N fails).
    max_n = int(os.environ.get(MAX_N_ENV) or 0)
    mode = f"search up to N={max_n} ({MAX_N_ENV})" if max_n else f"fixed ladder {list(FIXED_LADDER)}"
    rows: list[dict[str, Any]] = []
    stopped = "search done" if max_n else "fixed ladder done"
    good, bad = 0, None
    ladder = iter(FIXED_LADDER)
    n: int | None = START_N if max_n else next(ladder, None)
    while n is not None:
        need = n * MB_PER_DEVICE_BUDGET + MEM_RESERVE_MB
        avail = psutil.virtual_memory().available / 2**20
        if avail < need:
            stopped = f"memory: N={n} needs ~{need} MB, {avail:.0f} MB available"
            break
        r = fleet_point(n)
        rows.append(r)
        problems += [f"N={n}: {p}" for p in r.get("cleanup_problems", [])]
        print(_scale_line(r), flush=True)
        if n == START_N:
            overhead[f"n{n}"] = r
            print(_overhead_line(f"N={n}", r), flush=True)
        if r["keeps_up"]:
            good = n
        else:
            bad = n
        n = _next_n(good, bad, max_n) if max_n else next(ladder, None)
    keeping = [r["n"] for r in rows if r["keeps_up"]]
    largest = max(keeping) if keeping else None
    first_fail = min((r for r in rows if not r["keeps_up"]), key=lambda r: r["n"], default=None)
    print(f"  fleet ({mode}): largest N keeping up = {largest} ({stopped}); {CAVEAT}", flush=True)
    out["fleet"] = {"mode": mode, "ran_n": [r["n"] for r in rows], "table": [_brief(r) for r in rows],
                    "largest_keeping_up": largest,
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
