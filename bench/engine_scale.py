"""The virtual-clock simulator at fleet scale: up to 100,000 simulated devices, a 1M-parameter
dense model, and memory measured against ACTIVE devices (online at once) and TOTAL devices.

A fleet of `total` devices in which every device follows the same on/off cycle (on 20 s, off
20 s x (total/active - 1), phases spread evenly), so about `active` devices are online at any
time and the rest come and go: hellos, offline notices and abandoned tasks are in the event mix,
and the set of devices ever seen grows during a run. At most `IN_FLIGHT` tasks are out at once
(the strategy's concurrency / clients_per_round), because every task carries a 1M-parameter
model. Each case runs to a fixed number of versions, twice: once for CPU time (events per
process-CPU second, the whole `simulate()` call: engine, event loop and the devices' fake
training) and once under tracemalloc (peak bytes allocated during `simulate()`; the fleet and
its shared target vectors are built before, so they are not counted). Curves: memory vs active
at total = 100k, memory vs total at active = 1,000.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from server.aggregate import FloatArray
from server.engine import Engine, EngineConfig
from server.events import DeviceHello, DeviceOffline, Event
from server.memory import Periodic, SimDevice, VirtualClock, simulate
from server.policies import DenseModel
from server.strategies import get_strategy

N_PARAMS = 1_000_000
IN_FLIGHT = 32  # tasks out at once
VERSIONS = 20
ON_S = 20.0
# (total, active): vs total at active 1,000, then vs active at total 100,000
GRID = ((1_000, 1_000), (10_000, 1_000), (100_000, 1_000), (100_000, 250), (100_000, 4_000))
STRATEGIES = {
    "semi-async": {"concurrency": IN_FLIGHT, "k": IN_FLIGHT // 2},
    "fedavg": {"clients_per_round": IN_FLIGHT},
}
N_TARGETS = 8  # distinct target vectors shared by the fleet (32 MB at 1M params)


def make_fleet(total: int, active: int, targets: list[FloatArray], seed: int = 0) -> list[SimDevice]:
    rng = np.random.default_rng(seed)
    step_s = 0.1 * rng.lognormal(0.0, 0.5, size=total)
    samples = rng.integers(50, 500, size=total)
    off_s = ON_S * (total / active - 1.0)
    period = ON_S + off_s
    fleet = []
    for i in range(total):
        # phase spread evenly over the period: ~active devices online at every instant
        availability = Periodic(on_s=ON_S, off_s=off_s, phase_s=-period * i / total) if off_s > 0 else None
        kw = {"availability": availability} if availability is not None else {}
        fleet.append(SimDevice(f"d{i:06d}", targets[i % len(targets)], n_samples=int(samples[i]),
                               step_s=float(step_s[i]), local_steps=10, **kw))  # type: ignore[arg-type]
    return fleet


def _run(strategy_name: str, fleet: list[SimDevice], traced: bool) -> dict[str, Any]:
    strategy = get_strategy(strategy_name, **STRATEGIES[strategy_name])
    config = EngineConfig(eval_every=0, max_devices=max(len(fleet), EngineConfig.max_devices))
    clock = VirtualClock()
    engine = Engine(strategy, DenseModel(N_PARAMS), np.zeros(N_PARAMS, dtype=np.float32), clock=clock, config=config)
    inner: Callable[[Event], list[Any]] = engine.handle
    handle_cpu = [0.0]

    def timed(event: Event) -> list[Any]:
        t0 = time.process_time()
        try:
            return inner(event)
        finally:
            handle_cpu[0] += time.process_time() - t0

    if not traced:
        engine.handle = timed  # type: ignore[method-assign]
    gc.collect()
    if traced:
        tracemalloc.start()
    cpu0 = time.process_time()
    result = simulate(strategy, fleet, engine=engine, clock=clock, until_version=VERSIONS, keep_logs=False)
    cpu_s = time.process_time() - cpu0
    out: dict[str, Any] = {"events": result.n_events, "versions": engine.version, "virtual_s": round(clock.now, 1),
                           "devices_seen": len(engine.devices), "cpu_s": cpu_s, "handle_cpu_s": handle_cpu[0]}
    if traced:
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["peak_mb"] = peak / 1e6
        out["held_mb"] = current / 1e6  # still allocated when simulate returned: engine + result
    del result, engine
    return out


def engine_bytes_per_device(n: int = 20_000) -> float:
    """Engine state per device that said hello and went offline (its record, its hello, its
    entries in the engine's indices), from tracemalloc over n registrations."""
    zeros = np.zeros(10, dtype=np.float32)
    fleet = [SimDevice(f"d{i:06d}", zeros) for i in range(n)]
    engine = Engine(get_strategy("fedavg"), DenseModel(10), zeros, clock=VirtualClock(),
                    config=EngineConfig(max_devices=n, min_devices=n + 1))  # registers, never dispatches
    gc.collect()
    tracemalloc.start()
    for dev in fleet:
        engine.handle(DeviceHello(dev.device_id, dev.hello()))
        engine.handle(DeviceOffline(dev.device_id, "bench"))
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current / n


def _slope(rows: list[dict[str, Any]], name: str, vary: str, fixed: str, fixed_value: int) -> float | None:
    """Bytes of peak memory per extra device along one axis of the grid (ends of the curve)."""
    pts = sorted((r[vary], r["peak_mb"]) for r in rows if r["strategy"] == name and r[fixed] == fixed_value)
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return None
    return float(round((pts[-1][1] - pts[0][1]) * 1e6 / (pts[-1][0] - pts[0][0])))


def run(repeats: int = 2) -> dict[str, Any]:
    started = time.perf_counter()
    rng = np.random.default_rng(1)
    targets = [rng.standard_normal(N_PARAMS, dtype=np.float32) for _ in range(N_TARGETS)]
    rows = []
    for total, active in GRID:
        fleet = make_fleet(total, active, targets)
        for name in STRATEGIES:
            load = os.getloadavg()[0]
            timed = [_run(name, fleet, traced=False) for _ in range(repeats)]
            mem = _run(name, fleet, traced=True)
            cpu_s = statistics.median(r["cpu_s"] for r in timed)
            handle_s = statistics.median(r["handle_cpu_s"] for r in timed)
            row = {"strategy": name, "total": total, "active": active, "in_flight": IN_FLIGHT,
                   "n_params": N_PARAMS, "events": timed[0]["events"], "versions": timed[0]["versions"],
                   "virtual_s": timed[0]["virtual_s"], "devices_seen": timed[0]["devices_seen"],
                   "cpu_s": round(cpu_s, 2), "events_per_cpu_s": round(timed[0]["events"] / cpu_s),
                   "engine_events_per_cpu_s": round(timed[0]["events"] / handle_s) if handle_s > 0 else None,
                   "peak_mb": round(mem["peak_mb"], 1), "held_mb": round(mem["held_mb"], 1),
                   "loadavg_1m": round(load, 2)}
            rows.append(row)
            print(f"  engine-scale {name:<10} total {total:>6} active {active:>5}: {row['events']} events"
                  f" in {row['cpu_s']} CPU s = {row['events_per_cpu_s']} ev/CPU s"
                  f" (engine alone {row['engine_events_per_cpu_s']}); peak {row['peak_mb']} MB,"
                  f" held {row['held_mb']} MB ({row['devices_seen']} devices seen, load {load:.2f})", flush=True)
        del fleet
    per_device = round(engine_bytes_per_device())
    slopes = {name: {"bytes_per_total_device": _slope(rows, name, "total", "active", 1_000),
                     "bytes_per_active_device": _slope(rows, name, "active", "total", 100_000)}
              for name in STRATEGIES}
    print(f"  engine-scale: engine state {per_device} B per known device; peak bytes per device {slopes}", flush=True)
    return {"n_params": N_PARAMS, "in_flight": IN_FLIGHT, "versions": VERSIONS, "repeats": repeats,
            "rows": rows, "engine_bytes_per_known_device": per_device, "slopes": slopes,
            "section_wall_s": round(time.perf_counter() - started, 1)}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
