"""Per-run fleet figures of the testbed bench, in board time (bench/testbed_bench.py's FLEET).

A run's clock: every event has `wall_t` (unix) and `t` (board seconds since the campaign start),
and fleet.json has the dilation delta, so wall = start_unix + t x delta. devices/<id>.csv rows are
stamped in board seconds on the same origin.

  * telemetry rate: per device, samples at least one board period apart (`rate_hz`) per board
    second in the steady window [w0, w1] (see `window`);
  * delivered CPU: per device, over every span it spent training by its own clock (from each
    `device_status` "training" to its next status, device wall stamps `device_t`), the device
    cgroup's CPU (cpuacct.usage / cpu.stat usage_usec, sampled by the bench, linear between
    samples) over quota x wall span. The quota is a ceiling for the whole cgroup (agent +
    trainer), and a training trainer always wants more than it (one thread, CPU-bound), so a
    ratio below 1 means the host did not serve the group: other groups, the harness or other
    tenants held the CPU. Until stop 21 the spans ran between two consecutive telemetry rows both
    taken while training, which also counted the device's wait for its next task (the server's
    answer; an idle device is not short of CPU) whenever a task ended between two rows: at
    N = 128 only 0.88 of those spans was training. The trainer-only ratio of summary.json's
    fidelity check (the trainer's CPU over its steps / (train time x quota)) is reported next to
    it: it is lower by what the agent itself used inside the quota while the trainer trained;
  * between tasks: per device, board s from a task's end ("uploading") to its next "training"
    (the server's receipt, its next task, the task's decode); `training_share` is the share of
    each device's life after its first task that it spent training, and `receipt_to_task_wall_s`
    the wall time from an update's receipt to that device's next task frame. Under semi-async
    that is mostly the method's own wait: a device whose update was taken gets the next global
    model, which comes when the round closes at K updates (server/policies.py, "semi"), so it
    grows with the spread of task times across the fleet, not with the server's latency;
  * quota_enforced_over_planned_max: the largest ratio, over devices, of the quota the device
    reads from its cgroup to the one the dilation planned (fleet.json); ~1 when they agree;
  * RSS: agent and trainer, as the device reports them in its telemetry (psutil of its own
    processes), per device the median over rows taken with a trainer alive.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

BOARD_PERIOD_S = 1.0  # the devices' telemetry period in board seconds (runtime/device_config.py: 1 Hz)
SPACING_SLACK_S = 0.02
SETTLE_S = 2.0  # board seconds after the last device's first sample before the window opens
EDGE_S = 1.5  # board seconds: the last samples may still be in flight when the server stops


def _num(v: Any) -> float | None:
    with contextlib.suppress(TypeError, ValueError):
        x = float(v)
        return x if math.isfinite(x) else None
    return None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """devices/<id>.csv as dicts, t_s as float, in time order (unreadable rows skipped)."""
    rows = []
    with contextlib.suppress(OSError), path.open(newline="") as f:
        for r in csv.DictReader(f):
            t = _num(r.get("t_s"))
            if t is not None:
                rows.append({**r, "t_s": t})
    return sorted(rows, key=lambda r: r["t_s"])


def run_clock(events: Iterable[Mapping[str, Any]], dilation: float) -> float | None:
    """start_unix of the run's board clock, from the first event with both stamps."""
    for e in events:
        wall, t = _num(e.get("wall_t")), _num(e.get("t"))
        if wall is not None and t is not None:
            return wall - t * dilation
    return None


def rate_hz(ts: Sequence[float], a: float, b: float) -> float:
    """Samples in [a, b] at least one period apart (less SPACING_SLACK_S), taken greedily in time
    order, per second: the agent's periodic samples all count, the extra ones it takes at task
    ends only fill a period the periodic sampler left empty."""
    if b <= a:
        return 0.0
    n, last = 0, -math.inf
    for t in sorted(t for t in ts if a <= t <= b):
        if t >= last + BOARD_PERIOD_S - SPACING_SLACK_S:
            n, last = n + 1, t
    return n / (b - a)


def window(first_t: Sequence[float | None], server_start_t: float, end_t: float) -> tuple[float, float]:
    """[w0, w1] board s: from SETTLE_S after the last device's first sample (its start-up is not
    the rate), at latest from the middle of the server's life (a fleet that cannot start in time
    is measured from there, its late devices counting 0 until they are up), to EDGE_S before the
    end."""
    half = server_start_t + (end_t - server_start_t) / 2
    up = [t for t in first_t if t is not None]
    all_up = max(up) + SETTLE_S if up and len(up) == len(first_t) else math.inf
    return min(all_up, half), end_t - EDGE_S


def _interp(series: Sequence[tuple[float, float]], t: float) -> float | None:
    if not series or t < series[0][0] or t > series[-1][0]:
        return None
    lo, hi = 0, len(series) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if series[mid][0] <= t:
            lo = mid
        else:
            hi = mid
    (t0, u0), (t1, u1) = series[lo], series[hi]
    return u0 if t1 <= t0 else u0 + (u1 - u0) * (t - t0) / (t1 - t0)


def status_spans(events: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[float, float, str]]]:
    """Per device, (start, end, state) wall spans by its own clock (`device_status` device_t): each
    state lasts until the device's next status; the last one is left out (no end)."""
    stamps: dict[str, list[tuple[float, str]]] = {}
    for e in events:
        t = _num(e.get("device_t"))
        if e.get("event") == "device_status" and t is not None and isinstance(e.get("device"), str):
            stamps.setdefault(e["device"], []).append((t, str(e.get("state"))))
    out: dict[str, list[tuple[float, float, str]]] = {}
    for device, seq in stamps.items():
        seq.sort()
        out[device] = [(a, b, state) for (a, state), (b, _) in itertools.pairwise(seq) if b > a]
    return out


def delivered(spans: Sequence[tuple[float, float]], usage: Sequence[tuple[float, float]],
              quota_cores: float) -> dict[str, float] | None:
    """The cgroup's CPU over quota x wall time, summed over the wall spans it has samples for."""
    got = owed = 0.0
    for wa, wb in spans:
        ua, ub = _interp(usage, wa), _interp(usage, wb)
        if ua is None or ub is None:
            continue
        got += ub - ua
        owed += quota_cores * (wb - wa)
    if owed <= 0:
        return None
    return {"cpu_s": round(got, 4), "owed_cpu_s": round(owed, 4), "ratio": round(got / owed, 4)}


def between_tasks(spans: Sequence[tuple[float, float, str]]) -> tuple[list[float], float | None]:
    """Wall s from each task's end ("uploading") to the next "training", and the share of the
    time from the first "training" on that was spent training."""
    gaps, ended = [], None
    for a, _b, state in spans:
        if state == "uploading":
            ended = a
        elif state == "training" and ended is not None:
            gaps.append(a - ended)
            ended = None
    training = [(a, b) for a, b, state in spans if state == "training"]
    if not training:
        return gaps, None
    life = spans[-1][1] - training[0][0]
    return gaps, (sum(b - a for a, b in training) / life if life > 0 else None)


def receipt_to_task_wall_s(events: Iterable[Mapping[str, Any]]) -> list[float]:
    """The server's wall s from a device's `receipt_sent` to its next `task_frame`."""
    receipt: dict[str, float] = {}
    out = []
    for e in events:
        device, t = e.get("device"), _num(e.get("wall_t"))
        if not isinstance(device, str) or t is None:
            continue
        if e.get("event") == "receipt_sent":
            receipt[device] = t
        elif e.get("event") == "task_frame" and device in receipt:
            out.append(t - receipt.pop(device))
    return out


def _median(xs: Sequence[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def rss_split(rows_by_device: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Per device the median agent and trainer RSS over rows with a trainer alive; over devices
    the median of each and of their sum, and the largest sum."""
    agent, trainer, total = [], [], []
    for rows in rows_by_device.values():
        pairs = [(a, t) for r in rows if (a := _num(r.get("rss_agent_mb"))) and (t := _num(r.get("rss_trainer_mb")))]
        if pairs:
            a_med, t_med = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
            agent.append(a_med)
            trainer.append(t_med)
            total.append(a_med + t_med)
    return {"agent_mb_median": _median(agent), "trainer_mb_median": _median(trainer),
            "device_mb_median": _median(total), "device_mb_max": round(max(total), 1) if total else None,
            "devices": len(total)}


def fleet_figures(run: Path, events: Sequence[Mapping[str, Any]], fleet: Mapping[str, Any],
                  usage_series: Mapping[str, Sequence[tuple[float, float]]],
                  newest_ticks: Sequence[tuple[float, Sequence[float]]]) -> dict[str, Any]:
    """Telemetry in board time, delivered CPU and RSS of one run (see the module docstring)."""
    dilation = _num(fleet.get("time_dilation")) or 1.0
    devices = [d for d in fleet.get("devices", []) if isinstance(d, dict) and "id" in d]
    first = {e["event"]: e for e in reversed(events) if "event" in e}
    start_unix = run_clock(events, dilation)
    s0, fin = _num(first.get("server_start", {}).get("t")), _num(first.get("finished", {}).get("t"))
    out: dict[str, Any] = {"dilation": dilation, "quota_cores_per_device": _median(
        [q for d in devices if (q := _num(d.get("cpu_quota_cores"))) is not None])}
    if start_unix is None or s0 is None or fin is None or not devices:
        out["error"] = "no server_start/finished events or no devices: nothing to measure"
        return out
    rows = {d["id"]: read_rows(run / "devices" / f"{d['id']}.csv") for d in devices}
    w0, w1 = window([r[0]["t_s"] if r else None for r in rows.values()], s0, fin)
    rates = [rate_hz([r["t_s"] for r in rs], w0, w1) for rs in rows.values()]
    out.update(board_window_s=[round(w0, 2), round(w1, 2)], board_span_s=round(fin - s0, 2),
               telemetry_hz_median=_median(rates), telemetry_hz_min=round(min(rates), 3),
               devices_without_telemetry=sum(1 for r in rows.values() if not r),
               startup_board_s_median=_median([r[0]["t_s"] for r in rows.values() if r]),
               startup_board_s_max=max((r[0]["t_s"] for r in rows.values() if r), default=None))
    lags = [statistics.median((now - start_unix) / dilation - t for t in newest)
            for now, newest in newest_ticks if w0 <= (now - start_unix) / dilation <= w1]
    out["telemetry_lag_board_s_median"] = _median(lags)
    per_device: dict[str, Any] = {}
    over_planned = []
    spans = status_spans(events)
    gaps_s: list[float] = []
    shares: list[float] = []
    for d in devices:
        # The quota the cgroup enforces, as the device reads it (full precision; fleet.json rounds)
        enforced = [q for r in rows[d["id"]] if (q := _num(r.get("cpu_quota_cores")))]
        quota = statistics.median(enforced) if enforced else _num(d.get("cpu_quota_cores"))
        planned = _num(d.get("cpu_quota_cores"))
        if enforced and planned:
            over_planned.append(statistics.median(enforced) / planned)
        mine = spans.get(d["id"], [])
        gaps, share = between_tasks(mine)
        gaps_s += gaps
        if share is not None:
            shares.append(share)
        training = [(a, b) for a, b, state in mine if state == "training"]
        got = delivered(training, usage_series.get(d["id"], ()), quota) if quota else None
        if got is not None:
            per_device[d["id"]] = got
    ratios = [v["ratio"] for v in per_device.values()]
    out["delivered_cpu"] = {"median": _median(ratios), "min": round(min(ratios), 4) if ratios else None,
                            "devices_measured": len(ratios), "devices": len(devices),
                            "training_board_s": round(sum(b - a for ss in spans.values()
                                                          for a, b, state in ss if state == "training")
                                                      / dilation, 1),
                            "per_device": per_device}
    receipt_to_task = receipt_to_task_wall_s(events)
    out["between_tasks"] = {"board_s_median": _median([g / dilation for g in gaps_s]),
                            "training_share_median": _median(shares),
                            "training_share_min": round(min(shares), 3) if shares else None,
                            "receipt_to_task_wall_s_median": _median(receipt_to_task),
                            "receipt_to_task_board_s_median": _median([g / dilation for g in receipt_to_task])}
    # The enforced quota over the one dilation planned (fleet.json, 4 decimals): ~1 when the
    # devices are held to their share; above it the fleet gets more CPU than planned.
    out["quota_enforced_over_planned_max"] = round(max(over_planned), 3) if over_planned else None
    out["rss"] = rss_split(rows)
    return out
