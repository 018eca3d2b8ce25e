"""The round engine at fleet scale: 1,000 simulated devices on a virtual clock (server/memory.py).

`simulate()` drives a real `Engine` with `SimDevice`s (no ONNX Runtime, no MQTT): device speeds
are log-normal (median 1 s per task, a few 5x stragglers), and 10% of the fleet follows an on/off
availability cycle, so hellos, offline notices and abandoned tasks are in the event mix. Every
`Engine.handle` call is timed in process CPU time (the host is shared) by wrapping the engine's
bound method.

Figures per case (strategy x model size):
  * events_per_s:        events handled / seconds spent inside `Engine.handle` (the engine alone);
  * sim_events_per_s:    the same over the whole `simulate()` CPU time (engine + simulator,
                         including the fake training of each task), i.e. what a scale test sees;
  * close_to_dispatch_ms: CPU time of each `handle(UpdateReceived)` call that closes a round and
                         hands out the next round's tasks (SendTask actions): validate the update,
                         weigh and merge the pending updates, publish the version, dispatch.
                         Median and p95 over the rounds, with the mean number of tasks dispatched;
  * update_us_median:    a plain (non-closing) update's handle time, for comparison.
Model sizes: 10k parameters (the engine's bookkeeping dominates) and one 1M-parameter point with
100 devices (the merge dominates). The fleet-scale cases (up to 100,000 devices, memory against
active and total devices) are `bench/engine_scale.py`, reported under "scale".
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from server.engine import Engine, EngineConfig
from server.events import Event, NewGlobal, SendTask, UpdateReceived
from server.memory import AlwaysOn, Availability, Periodic, SimDevice, VirtualClock, simulate
from server.policies import DenseModel
from server.strategies import get_strategy

STRATEGIES = ("semi-async", "fedavg")
# (label, params, devices, versions to run)
SIZES = (("10k", 10_000, 1_000, 30), ("1M", 1_000_000, 100, 8))
WALL_LIMIT_S = 40.0  # per case: stop simulating (cleanly) past this, whatever the machine's load


def make_fleet(n_devices: int, n_params: int, seed: int = 0, n_targets: int = 16) -> list[SimDevice]:
    """Heterogeneous fleet; targets are shared among devices (16 distinct) to bound memory."""
    rng = np.random.default_rng(seed)
    targets = [rng.standard_normal(n_params, dtype=np.float32) for _ in range(n_targets)]
    fleet = []
    for i in range(n_devices):
        step_s = float(0.1 * rng.lognormal(0.0, 0.5)) * (5.0 if i % 50 == 7 else 1.0)
        availability: Availability = AlwaysOn()
        if i % 10 == 3:  # 10% churn: on 20 s, off 5 s, phases spread out
            availability = Periodic(on_s=20.0, off_s=5.0, phase_s=-float(rng.uniform(0.0, 20.0)))
        fleet.append(SimDevice(f"d{i:04d}", targets[i % n_targets], n_samples=int(rng.integers(50, 500)),
                               step_s=step_s, local_steps=10, availability=availability))
    return fleet


class _WallLimit(Exception):
    pass


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


def bench_case(strategy_name: str, n_params: int, n_devices: int, versions: int) -> dict[str, Any]:
    strategy = get_strategy(strategy_name)
    fleet = make_fleet(n_devices, n_params)
    clock = VirtualClock()
    engine = Engine(strategy, DenseModel(n_params), np.zeros(n_params, dtype=np.float32), clock=clock,
                    config=EngineConfig(eval_every=0))
    handle_s: list[float] = []
    close_s: list[float] = []
    close_dispatched: list[int] = []
    update_s: list[float] = []
    inner: Callable[[Event], list[Any]] = engine.handle
    started = time.perf_counter()
    cpu0 = time.process_time()

    def timed(event: Event) -> list[Any]:
        if time.perf_counter() - started > WALL_LIMIT_S:
            raise _WallLimit  # bounded time on a loaded machine; the figures so far stand
        t0 = time.process_time()
        actions = inner(event)
        dt = time.process_time() - t0
        handle_s.append(dt)
        if isinstance(event, UpdateReceived):
            n_sent = sum(isinstance(a, SendTask) for a in actions)
            if any(isinstance(a, NewGlobal) for a in actions) and n_sent:
                close_s.append(dt)
                close_dispatched.append(n_sent)
            elif not n_sent:
                update_s.append(dt)
        return actions

    engine.handle = timed  # type: ignore[method-assign]
    truncated = False
    try:
        simulate(strategy, fleet, engine=engine, clock=clock, until_version=versions, keep_logs=False)
    except _WallLimit:
        truncated = True
    wall = time.perf_counter() - started
    cpu_s = time.process_time() - cpu0
    n_events = len(handle_s)
    return {
        "strategy": strategy_name, "n_params": n_params, "devices": n_devices,
        "versions": engine.version, "virtual_s": round(clock.now, 1), "events": n_events,
        "truncated": truncated, "wall_s": round(wall, 2),
        "events_per_s": round(n_events / sum(handle_s)) if handle_s else None,
        "sim_events_per_s": round(n_events / cpu_s) if cpu_s > 0 else None,
        "update_us_median": round(statistics.median(update_s) * 1e6, 1) if update_s else None,
        "close_to_dispatch_ms_median": round(statistics.median(close_s) * 1e3, 2) if close_s else None,
        "close_to_dispatch_ms_p95": round(_pct(close_s, 95) * 1e3, 2) if close_s else None,  # type: ignore[operator]
        "close_to_dispatch_n": len(close_s),
        "tasks_per_dispatch_mean": round(statistics.mean(close_dispatched), 1) if close_dispatched else None,
    }


def run() -> dict[str, Any]:
    rows = []
    for label, n_params, n_devices, versions in SIZES:
        for name in STRATEGIES:
            r = bench_case(name, n_params, n_devices, versions)
            r["size"] = label
            rows.append(r)
            print(f"  engine {name:<10} {label:>3} params x {n_devices} devices: {r['events']} events,"
                  f" {r['events_per_s']} ev/s in handle ({r['sim_events_per_s']} ev/s simulated);"
                  f" close->dispatch median {r['close_to_dispatch_ms_median']} ms,"
                  f" p95 {r['close_to_dispatch_ms_p95']} ms over {r['close_to_dispatch_n']} rounds"
                  f" ({r['tasks_per_dispatch_mean']} tasks each); plain update {r['update_us_median']} us"
                  + ("  [TRUNCATED at the wall limit]" if r["truncated"] else ""), flush=True)
    from bench import engine_scale  # 100,000 devices at 1M parameters: its own module

    return {"rows": rows, "scale": engine_scale.run()}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
