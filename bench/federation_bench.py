"""Semi-async vs synchronous FedAvg on one real local federation with two slow devices.

Setup (the same for both strategies): an embedded amqtt broker, the server process and 4 device
processes (LeNet-5 on scikit-learn digits, iid shards, 20 local steps per task) from
testbed/federate.py. Devices dev2 and dev3 are slowed down for real: each runs in its own cgroup
with a CPU quota of `SLOW_QUOTA_CORES` (testbed/throttle.py), applied the moment its process is
spawned (so the agent sizes its ORT threads to the quota) and to every descendant it starts later
(the trainer child, any restart), swept with psutil. dev0 and dev1 share the host freely.

Each run trains for `WINDOW_S` seconds after its first task dispatch and is then stopped, so both
strategies get the same wall time and `final_accuracy` compares like with like. Each strategy runs
`REPEATS` times, interleaved with the other (a change in the host's load hits both alike; no new
pair starts once `SECTION_BUDGET_S` is spent). Per strategy, medians over its runs (every run's
figures are kept under `runs`):
  * time_to_target_s:  seconds from the first task dispatch (events.jsonl `task_sent`, server
                       clock) to the first server.csv row whose held-out accuracy is >= `TARGET`
                       (None unless most runs got there). Timing starts at the first dispatch, so
                       the slow devices' start-up under the quota (equal for both) is left out;
  * time_to_target_sustained_s: from the first dispatch to the evaluation from which accuracy
                       stays >= `TARGET` to the end of the window; `min_accuracy_after_target` is
                       the lowest evaluation after the first crossing. Semi-async can cross and
                       then dip when a round's K updates are all stale ones from the slow devices;
  * time_to_s:         first crossing of several accuracy levels, for the curve;
  * final_accuracy (at the end of the window), rounds (versions published in the window),
    wall_s (the whole run, start-up and teardown included);
  * updates_per_device: how many of each device's updates were merged (per run);
  * slow_groups: the slow devices' cgroup counters at the end (CPU seconds received, CFS periods
                 throttled, processes in the group: agent + trainer + helpers), to show the quota bit.
`speedup` = FedAvg's time_to_target_s / semi-async's; `speedup_sustained` the same, sustained.

If no cgroup hierarchy is writable (not root, no cgroup v1/v2), the section reports
`skipped: no cgroups` instead of running unthrottled, since the comparison would be meaningless.
Run folders are kept under runs/bench-federation/ for inspection (logs, events, server.csv).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from runtime.errors import OrchardError
from testbed.broker import open_broker
from testbed.federate import Federation, FederationSpec, prepare, server_rows
from testbed.lab_secrets import load_lab
from testbed.throttle import DeviceGroup, Throttle, detect_throttle

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "bench-federation"
STRATEGIES = ("semi-async", "fedavg")
DEVICES = 4
SLOW = ("dev2", "dev3")
SLOW_QUOTA_CORES = 0.1
TARGET = 0.85
LOCAL_STEPS = 20
LEVELS = (0.7, 0.8, 0.85, 0.9, 0.95)
WINDOW_S = 6.0  # each run trains this long after its first task dispatch, then stops
MAX_VERSIONS = 500  # the server's own stop; the window ends a run long before
RUN_LIMIT_S = 40.0  # hard wall limit per strategy (start-up included)
SWEEP_S = 0.1
REPEATS = 2  # per strategy, interleaved
SECTION_BUDGET_S = 60.0  # no new repetition starts past this


class _Sweeper(threading.Thread):
    """Moves every descendant of the slow devices into their device's cgroup, as they appear."""

    def __init__(self, pids: dict[int, DeviceGroup]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.seen: dict[int, set[int]] = {pid: {pid} for pid in pids}
        self.stop = threading.Event()
        self.errors: list[str] = []

    def sweep(self) -> None:
        for root, group in self.pids.items():
            try:
                children = psutil.Process(root).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                if child.pid in self.seen[root]:
                    continue
                try:
                    group.add_pid(child.pid)
                    self.seen[root].add(child.pid)
                except OrchardError as exc:  # the child exited between listing and moving
                    if psutil.pid_exists(child.pid):
                        self.errors.append(str(exc))

    def run(self) -> None:
        while not self.stop.wait(SWEEP_S):
            self.sweep()


def _first_dispatch_t(run: Path) -> float | None:
    path = run / "events.jsonl"
    if not path.exists():
        return None
    with path.open() as f:
        for line in f:
            if '"task_sent"' in line:
                with contextlib.suppress(ValueError, KeyError):
                    return float(json.loads(line)["t"])
    return None


def _accuracies(rows: list[dict[str, str]]) -> list[tuple[float, float]]:
    out = []
    for r in rows:
        with contextlib.suppress(KeyError, ValueError):
            out.append((float(r["t_s"]), float(r["accuracy"])))
    return out


def _first_at(acc: list[tuple[float, float]], level: float) -> float | None:
    return next((t for t, a in acc if a >= level), None)


def _sustained_at(acc: list[tuple[float, float]], level: float) -> float | None:
    """The first time from which every later evaluation is >= level (None if the last is below)."""
    t_from: float | None = None
    for t, a in acc:
        if a < level:
            t_from = None
        elif t_from is None:
            t_from = t
    return t_from


def run_one(strategy: str, throttle: Throttle, rep: int = 0) -> dict[str, Any]:
    spec = FederationSpec(out=OUT / f"{strategy}-{rep}", devices=DEVICES, strategy=strategy, rounds=MAX_VERSIONS,
                          model="lenet", dataset="digits", partition="iid", local_steps=LOCAL_STEPS, seed=0,
                          time_limit_s=RUN_LIMIT_S)
    run = prepare(spec, force=True)
    started = time.monotonic()
    groups: dict[str, DeviceGroup] = {}
    sweeper: _Sweeper | None = None
    stopped = "server finished"
    slow_stats: dict[str, dict[str, Any]] = {}
    with open_broker("amqtt", lab=load_lab(run)) as broker:
        fed = Federation(run, broker.url)
        try:
            fed.start_server()
            for device_id in spec.device_ids():
                fed.start_device(device_id)
                if device_id in SLOW:
                    group = throttle.create(f"{strategy}-{rep}-{device_id}", SLOW_QUOTA_CORES, None)
                    groups[device_id] = group
                    group.add_pid(fed.devices[device_id].pid)  # before its interpreter gets going
            sweeper = _Sweeper({fed.devices[d].pid: g for d, g in groups.items()})
            sweeper.sweep()
            sweeper.start()
            assert fed.server is not None
            dispatched_at: float | None = None  # this process's clock, when the first task_sent was seen
            while fed.server.poll() is None:
                time.sleep(0.2)
                now = time.monotonic()
                if dispatched_at is None and _first_dispatch_t(run) is not None:
                    dispatched_at = now
                if dispatched_at is not None and now - dispatched_at > WINDOW_S + 0.3:
                    stopped = f"training window of {WINDOW_S:g} s"
                    break
                if now - started > RUN_LIMIT_S + 10:
                    stopped = f"run limit of {RUN_LIMIT_S + 10:g} s"
                    break
        finally:
            if sweeper is not None:
                sweeper.stop.set()
                sweeper.join(2)
            for device_id, group in groups.items():
                with contextlib.suppress(OrchardError):
                    st = group.stats()
                    slow_stats[device_id] = {"cpu_usage_s": round(st.cpu_usage_s, 2), "nr_periods": st.nr_periods,
                                             "nr_throttled": st.nr_throttled, "throttled_s": round(st.throttled_s, 2),
                                             "pids_in_group": len(st.pids)}
            fed.stop_all()
            for group in groups.values():
                try:
                    group.destroy()
                except OrchardError as exc:
                    print(f"  federation: could not remove cgroup {group.name}: {exc}", flush=True)
    wall = time.monotonic() - started
    t0 = _first_dispatch_t(run)
    # Only what happened within the window after the first dispatch, so both strategies get the same time.
    rows = [r for r in server_rows(run) if t0 is not None and _wall(r) - t0 <= WINDOW_S]
    acc = [(t - (t0 or 0.0), a) for t, a in _accuracies(rows)]
    per_device = dict.fromkeys(spec.device_ids(), 0)
    for r in rows:
        for d in (r.get("devices") or "").split():
            per_device[d] = per_device.get(d, 0) + 1
    first = _first_at(acc, TARGET)
    return {
        "strategy": strategy, "run": str(run), "target": TARGET,
        "time_to_target_s": None if first is None else round(first, 2),
        "time_to_target_sustained_s": None if (t := _sustained_at(acc, TARGET)) is None else round(t, 2),
        "min_accuracy_after_target": min((a for t, a in acc if first is not None and t >= first), default=None),
        "time_to_s": {str(lv): (None if (t := _first_at(acc, lv)) is None else round(t, 2)) for lv in LEVELS},
        "final_accuracy": acc[-1][1] if acc else None,
        "best_accuracy": max(a for _, a in acc) if acc else None,
        "rounds": len(rows), "first_dispatch_server_s": None if t0 is None else round(t0, 2),
        "wall_s": round(wall, 1), "stopped": stopped,
        "server_exit": fed.server.returncode if fed.server is not None else None,
        "updates_per_device": per_device,
        "slow_groups": slow_stats,  # proof the quota bit: CFS periods throttled, processes inside
        "sweeper_errors": sweeper.errors if sweeper is not None else [],
    }


def _wall(row: dict[str, str]) -> float:
    try:
        return float(row["t_s"])
    except (KeyError, ValueError):
        return float("inf")


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def summarise(strategy: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repetitions that produced figures; every run is kept under `runs`."""
    ok = [r for r in runs if "error" not in r]
    reached = [r["time_to_target_s"] for r in ok if r["time_to_target_s"] is not None]
    sus = [r["time_to_target_sustained_s"] for r in ok if r["time_to_target_sustained_s"] is not None]
    return {
        "strategy": strategy, "repeats": len(runs), "reached": len(reached),
        # None unless most runs reached the target: a median over the lucky ones would flatter.
        "time_to_target_s": _median(reached) if reached and 2 * len(reached) > len(ok) else None,
        "time_to_target_sustained_s": _median(sus) if sus and 2 * len(sus) > len(ok) else None,
        "min_accuracy_after_target": _median([r["min_accuracy_after_target"] for r in ok
                                              if r["min_accuracy_after_target"] is not None]),
        "time_to_s": {str(lv): _median([r["time_to_s"][str(lv)] for r in ok if r["time_to_s"][str(lv)] is not None])
                      for lv in LEVELS},
        "final_accuracy": _median([r["final_accuracy"] for r in ok if r["final_accuracy"] is not None]),
        "rounds": _median([r["rounds"] for r in ok]),
        "wall_s": _median([r["wall_s"] for r in ok]),
        "runs": runs,
    }


def run(repeats: int = REPEATS) -> dict[str, Any]:
    try:
        throttle = detect_throttle(prefix="orchard-bench")
    except OrchardError as exc:
        print(f"  federation skipped: no cgroups ({exc})", flush=True)
        return {"skipped": f"no cgroups: {exc}"}
    if throttle.backend == "none":
        print(f"  federation skipped: no cgroups ({throttle.warning})", flush=True)
        return {"skipped": f"no cgroups: {throttle.warning}"}
    out: dict[str, Any] = {"backend": throttle.backend, "devices": DEVICES, "slow": list(SLOW),
                           "slow_quota_cores": SLOW_QUOTA_CORES, "target": TARGET, "model": "lenet",
                           "dataset": "digits", "partition": "iid", "local_steps": LOCAL_STEPS}
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in STRATEGIES}
    started = time.monotonic()
    try:
        # Interleaved (semi, sync, semi, sync, ...) so a change in the host's load hits both alike.
        for rep in range(repeats):
            if rep and time.monotonic() - started > SECTION_BUDGET_S:
                print(f"  federation: stopping after {rep} repetitions (section budget "
                      f"{SECTION_BUDGET_S:.0f} s spent)", flush=True)
                break
            for strategy in STRATEGIES:
                try:
                    r = run_one(strategy, throttle, rep)
                except Exception as exc:  # measure, never crash the whole `make bench`
                    print(f"  federation {strategy}: failed: {type(exc).__name__}: {exc}", flush=True)
                    runs[strategy].append({"strategy": strategy, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                runs[strategy].append(r)
                ttt = r["time_to_target_s"]
                print(f"  federation {strategy:<10} run {rep}: time to {TARGET:.2f}: "
                      f"{'not reached' if ttt is None else f'{ttt:.2f} s'} after first dispatch"
                      f" (sustained: {r['time_to_target_sustained_s']}, min after: {r['min_accuracy_after_target']});"
                      f" final acc {r['final_accuracy']}, {r['rounds']} versions, {r['wall_s']} s wall,"
                      f" updates/device {r['updates_per_device']} ({r['stopped']})", flush=True)
    finally:
        throttle.close()
    for strategy in STRATEGIES:
        out[strategy] = summarise(strategy, runs[strategy])
        o = out[strategy]
        print(f"  federation {strategy:<10} median time to {TARGET:.2f}: {o['time_to_target_s']} s first crossing"
              f" ({o['reached']}/{o['repeats']} runs), {o['time_to_target_sustained_s']} s sustained;"
              f" final accuracy {o['final_accuracy']} after {WINDOW_S:g} s, {o['rounds']} versions", flush=True)
    semi, sync = out["semi-async"]["time_to_target_s"], out["fedavg"]["time_to_target_s"]
    out["speedup"] = round(sync / semi, 2) if semi and sync else None
    semi, sync = out["semi-async"]["time_to_target_sustained_s"], out["fedavg"]["time_to_target_sustained_s"]
    out["speedup_sustained"] = round(sync / semi, 2) if semi and sync else None
    print(f"  federation speed-up of semi-async over FedAvg to {TARGET:.2f}: {out['speedup']} first crossing,"
          f" {out['speedup_sustained']} sustained", flush=True)
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
