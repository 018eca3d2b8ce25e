"""How faithfully a run emulated its boards: did each device get its quota?

Every accepted update carries the trainer's CPU time over its steps (`cpu_s`) and the cgroup
quota it ran under; `cpu_s / (train wall time x min(quota, threads))` is the share of its quota
the device really got while it trained. Below DELIVERED_MIN the report names the device: other
tenants of the host (or an oversubscribed fleet) took CPU from it, so its times are slower than
the board's. Step times per tier are the report's `groups[].task_step_ms_median` (a task's mean
step: single steps are bimodal under CFS bursts).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

DELIVERED_MIN = 0.9


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _metrics(update: Mapping[str, Any]) -> Mapping[str, Any]:
    m = update.get("metrics")
    return m if isinstance(m, dict) else {}


def read_updates(run_dir: Path) -> list[dict[str, Any]]:
    """The update_accepted events of a run (unreadable lines skipped)."""
    out: list[dict[str, Any]] = []
    path = run_dir / "events.jsonl"
    if not path.is_file():
        return out
    with path.open(errors="replace") as f:
        for line in f:
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(e, dict) and e.get("event") == "update_accepted" and isinstance(e.get("device"), str):
                out.append(e)
    return out


def delivered_cpu(updates: Iterable[Mapping[str, Any]], dilation: float,
                  threads: Mapping[str, int]) -> dict[str, dict[str, float | int]]:
    """Per device: tasks measured, CPU received, CPU owed, and their ratio."""
    totals: dict[str, list[float]] = {}
    for u in updates:
        metrics = _metrics(u)
        cpu_s, quota, train_s = _num(metrics.get("cpu_s")), _num(metrics.get("cpu_quota_cores")), _num(u.get("train_s"))
        if cpu_s is None or quota is None or train_s is None or train_s <= 0 or quota <= 0:
            continue  # an unthrottled device, or a runtime that does not report it
        owed = train_s * dilation * min(quota, float(threads.get(u["device"], 1) or 1))
        t = totals.setdefault(u["device"], [0, 0.0, 0.0])
        t[0] += 1
        t[1] += cpu_s
        t[2] += owed
    return {d: {"tasks": int(n), "cpu_s": round(got, 4), "owed_cpu_s": round(owed, 4), "ratio": round(got / owed, 4)}
            for d, (n, got, owed) in totals.items() if owed > 0}


def check(run_dir: Path, fleet: Mapping[str, Any] | None) -> dict[str, Any]:
    """summary.json's "fidelity" entry, and one warning per device that got too little CPU."""
    fleet = fleet or {}
    devices = [d for d in fleet.get("devices", []) if isinstance(d, dict) and "id" in d]
    dilation = _num(fleet.get("time_dilation")) or 1.0
    updates = read_updates(run_dir)
    delivered = delivered_cpu(updates, dilation, {str(d["id"]): int(d.get("threads") or 1) for d in devices})
    short = {d: v for d, v in delivered.items() if v["ratio"] < DELIVERED_MIN}
    warnings = [f"{d} got {v['ratio']:.0%} of its CPU quota while training ({v['cpu_s']:.2f} of {v['owed_cpu_s']:.2f} "
                f"CPU s over {v['tasks']} tasks): the host could not serve it, so its times are slower than the board's"
                for d, v in sorted(short.items())]
    return {"delivered_cpu_min": DELIVERED_MIN, "delivered_cpu": delivered, "underdelivered": sorted(short),
            "warnings": warnings}
