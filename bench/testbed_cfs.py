"""Two small probes of the CFS mechanics a fleet point relies on, on real cgroups made as the testbed
makes them (testbed.throttle; the device tree at top weight), cheap enough to run before any fleet:

  * quota_delivery: one group per quota (0.012 / 0.024 / 0.05 core: a Pi 4's at N = 128 / 64 / 32
    on this host) with the testbed's period (`cpu_period_us`: 2 ms of quota per period) and with
    the kernel's 100 ms, each running a device-shaped pair: a CPU-bound child (the trainer) and a
    parent that wakes WAKE_HZ times a second (the agent). All groups run at once (their quotas add
    up to 0.17 core). delivered = cpuacct.usage over quota x wall, over a window that opens once
    the child runs; throttled = nr_throttled / nr_periods. Median over REPS windows;
  * harness_wait: HARNESS_DEVICES device groups whose quotas add up to the capacity dilation plans
    (host cores - 0.5), each saturated by a CPU-bound child, and a harness-shaped probe (wakes
    every 20 ms, works 1 ms: the server and broker) either in the root group (where broker and
    server ran until this stop) or in the run's harness group (Throttle.create_harness). Figure:
    the probe's run-queue wait per second of its CPU (/proc/self/schedstat), median over REPS
    interleaved pairs. ~0 means served at once; >> 1 means it queues behind the devices and
    every other tenant of the root group.
Both report the 1-min load average next to each figure: the host is shared."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

QUOTAS_CORES = (0.012, 0.024, 0.05)
KERNEL_PERIOD_US = 100_000
WAKE_HZ = 20
WINDOW_S = 8.0  # ~48 periods at 0.012 core: a window's edges cut one period, ~2 % of it
REPS = 2
HARNESS_DEVICES = 16
HARNESS_PROBE_S = 5.0
RESERVE_CORES = 0.5


def _in_group(add_pid: Callable[[int], None], body: Callable[[], None]) -> int:
    """Fork a child that runs `body` once `add_pid` has put it in its group (so nothing it forks
    starts outside). Returns its pid."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(w)
            os.read(r, 1)
            body()
        finally:
            os._exit(0)
    os.close(r)
    add_pid(pid)
    os.write(w, b"x")
    os.close(w)
    return pid


def _burn() -> None:
    x = 0
    while True:
        x += 1


def _device_pair() -> None:
    """A CPU-bound child and a parent that wakes WAKE_HZ times a second (the agent's shape)."""
    child = os.fork()
    if child == 0:
        _burn()
    signal.signal(signal.SIGTERM, lambda *_: (os.kill(child, signal.SIGKILL), os._exit(0)))
    while True:
        time.sleep(1.0 / WAKE_HZ)
        sum(range(500))


def _stop(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def quota_delivery(throttle: Any) -> dict[str, Any]:
    from testbed.cgroups import cpu_period_us, cpu_quota_us

    rows: dict[str, list[tuple[float, float]]] = {}
    loads = []
    for rep in range(REPS):
        groups, pids = [], []
        try:
            for q in QUOTAS_CORES:
                for period in (cpu_period_us(q), KERNEL_PERIOD_US):
                    g = throttle.create(f"q{round(q * 1000)}-p{period}-{rep}", q, 256)
                    g._write_cpu_quota(cpu_quota_us(q, throttle.host_cores, period), period)
                    g.set_cpu_weight(q)
                    pids.append(_in_group(g.add_pid, _device_pair))
                    groups.append((q, period, g))
            throttle.prioritise_cpu()
            time.sleep(1.0)  # every child runs
            before = [(g.stats(), time.monotonic()) for *_, g in groups]
            time.sleep(WINDOW_S)
            after = [(g.stats(), time.monotonic()) for *_, g in groups]
            loads.append(os.getloadavg()[0])
        finally:
            _stop(pids)
            for *_, g in groups:
                g.destroy()
        for (q, period, _), (a, ta), (b, tb) in zip(groups, before, after, strict=True):
            delivered = (b.cpu_usage_s - a.cpu_usage_s) / (q * (tb - ta))
            throttled = (b.nr_throttled - a.nr_throttled) / max(1, b.nr_periods - a.nr_periods)
            rows.setdefault(f"{q:g} core, period {period // 1000} ms", []).append((delivered, throttled))
    return {"window_s": WINDOW_S, "reps": REPS, "wake_hz": WAKE_HZ,
            "points": {k: {"delivered_median": round(statistics.median(d for d, _ in v), 4),
                           "delivered_all": [round(d, 4) for d, _ in v],
                           "throttled_periods_median": round(statistics.median(t for _, t in v), 3)}
                       for k, v in rows.items()},
            "loadavg_1m": [round(x, 2) for x in loads]}


def _probe(seconds: float) -> float:
    """Run-queue wait per CPU second of a loop that sleeps 20 ms and works 1 ms."""
    def stat() -> tuple[int, int]:
        run_ns, wait_ns, _ = map(int, Path("/proc/self/schedstat").read_text().split())
        return run_ns, wait_ns

    r0, w0 = stat()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.02)
        c = time.process_time()
        while time.process_time() - c < 0.001:
            pass
    r1, w1 = stat()
    return (w1 - w0) / max(1, r1 - r0)


def _probe_in(add_pid: Callable[[int], None] | None, seconds: float) -> float:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            if add_pid is not None:
                add_pid(os.getpid())
            os.write(w, repr(_probe(seconds)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    return float(out)


def harness_wait(throttle: Any) -> dict[str, Any]:
    cores = throttle.host_cores
    quota = (cores - RESERVE_CORES) / HARNESS_DEVICES
    pids: list[int] = []
    waits: dict[str, list[float]] = {"root": [], "harness_group": []}
    loads = []
    harness = None
    try:
        for i in range(HARNESS_DEVICES):
            g = throttle.create(f"dev-{i}", quota, 256)
            g.set_cpu_weight(quota)
            pids.append(_in_group(g.add_pid, _burn))
        throttle.prioritise_cpu()
        harness = throttle.create_harness(RESERVE_CORES)
        time.sleep(1.0)
        for _ in range(REPS):
            waits["root"].append(_probe_in(None, HARNESS_PROBE_S))
            waits["harness_group"].append(_probe_in(harness.add_pid, HARNESS_PROBE_S))
            loads.append(os.getloadavg()[0])
    finally:
        _stop(pids)
        if harness is not None:
            harness.destroy()
    return {"devices": HARNESS_DEVICES, "device_quota_cores": round(quota, 4), "probe_s": HARNESS_PROBE_S,
            "reps": REPS,
            "runqueue_wait_per_cpu_s_median": {k: round(statistics.median(v), 2) for k, v in waits.items()},
            "runqueue_wait_per_cpu_s_all": {k: [round(x, 2) for x in v] for k, v in waits.items()},
            "loadavg_1m": [round(x, 2) for x in loads]}


def run() -> dict[str, Any]:
    from testbed.throttle import detect_throttle

    out: dict[str, Any] = {}
    for name, fn in (("quota_delivery", quota_delivery), ("harness_wait", harness_wait)):
        try:
            throttle = detect_throttle(prefix="orchard", run_id=f"tbbench-cfs-{os.getpid()}", required=True)
        except Exception as exc:  # no writable cgroups: nothing to measure
            return {"error": f"{type(exc).__name__}: {exc}"}
        t0 = time.monotonic()
        try:
            out[name] = fn(throttle)
        except Exception as exc:  # the bench reports, it does not crash
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            throttle.close()
        out[name]["wall_s"] = round(time.monotonic() - t0, 1)
    return out


if __name__ == "__main__":
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(run(), indent=1))
