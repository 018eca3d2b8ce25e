"""Figures of a run broken down by what was trained: the served model, accuracy per profile,
per tier ([[fleet]] group), and energy up to a time. Definitions in `testbed/report.py`."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.errors import ConfigError
from runtime.profile import parse_profile

if TYPE_CHECKING:
    from testbed.run_data import Round, RunData

GLOBAL = "dense"


def _leading_width(profile: str) -> float | None:
    """The width of a leading-channel submodel over all classes; None for anything that covers the
    whole model over rounds or devices (dense, rolling windows, class subsets) or is unreadable."""
    try:
        p = parse_profile(profile)
    except ConfigError:
        return None
    return p.width if p.width < 1.0 and p.window == "leading" and p.classes is None else None


def trained_profiles(data: RunData) -> list[str]:
    """Every profile a task asked for, else what fleet.json assigned."""
    seen = {u.profile for u in data.updates if u.profile} | set(data.last_profile.values())
    if not seen:
        seen = {str(d.get("profile")) for d in (data.fleet or {}).get("devices", [])
                if isinstance(d, dict) and d.get("profile")}
    return sorted(seen)


def served_profile(data: RunData) -> str:
    """The global model, unless every device trains a leading-width submodel: then the widest."""
    widths = {p: _leading_width(p) for p in trained_profiles(data)}
    if not widths or any(w is None for w in widths.values()):
        return GLOBAL
    return max(widths, key=lambda p: widths[p] or 0.0)


def accuracy_of(profile: str, rnd: Round) -> float | None:
    """A round's accuracy for the model `profile` trains (the global model's for dense/rolling)."""
    if _leading_width(profile) is None and profile not in rnd.profile_accuracy:
        return rnd.accuracy
    return rnd.profile_accuracy.get(profile)


def served_curve(data: RunData) -> list[tuple[float, int, float]]:
    """(t_s, version, accuracy) of the served model, for every version it was scored at."""
    served = served_profile(data)
    points = [(r.t_s, r.version, accuracy_of(served, r)) for r in data.rounds]
    return [(t, v, a) for t, v, a in points if a is not None]


def final_profile_accuracy(data: RunData) -> dict[str, float | None]:
    """Accuracy of each profile's model at the last version that scored it; "dense" = global."""
    out: dict[str, float | None] = {GLOBAL: next((r.accuracy for r in reversed(data.rounds)
                                                  if r.accuracy is not None), None)}
    for r in data.rounds:
        out.update(r.profile_accuracy)
    return out


def energy_until_j(data: RunData, t_s: float | None) -> float | None:
    """The fleet's telemetry energy from each device's start up to t_s (None without a time)."""
    if t_s is None:
        return None
    curves = [tr for d, tr in data.traces.items() if d in data.devices and tr.t_s.size]
    if not curves:
        return None
    return sum(float(np.interp(t_s, tr.t_s, tr.energy_j, left=0.0)) for tr in curves)


def group_rows(data: RunData, device_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per tier: board, devices, profile(s), the accuracy of its model, work and resources."""
    final = final_profile_accuracy(data)
    rows = []
    for group in dict.fromkeys(data.groups[d] for d in data.devices):
        members = [row for row in device_rows if data.groups.get(row["id"]) == group]
        ids = {row["id"] for row in members}
        profiles = sorted({data.last_profile[d] for d in ids if d in data.last_profile}
                          or {str(row.get("profile")) for row in members if row.get("profile")})
        accuracy = [final.get(p) if _leading_width(p) is not None or p in final else final[GLOBAL] for p in profiles]
        steps = [u.step_ms_median for u in data.updates if u.device in ids and u.step_ms_median is not None]
        per_task = [1000 * u.train_s / data.local_steps for u in data.updates if u.device in ids and data.local_steps]
        rss = [row["peak_rss_mb"] for row in members if row.get("peak_rss_mb") is not None]
        energy = [row["energy_j"] for row in members if row.get("energy_j") is not None]
        rows.append({
            "group": group, "board": ", ".join(sorted({str(row.get("board")) for row in members})),
            "devices": len(members), "profiles": profiles,
            "accuracy": accuracy[0] if len(accuracy) == 1 else None,
            "updates": sum(int(row.get("updates") or 0) for row in members),
            "train_s": round(sum(float(row.get("train_s") or 0.0) for row in members), 3),
            "energy_j": round(sum(energy), 3) if energy else None,
            "peak_rss_mb": max(rss) if rss else None,
            "step_ms_median": round(statistics.median(steps), 3) if steps else None,
            "task_step_ms_median": round(statistics.median(per_task), 3) if per_task else None,
        })
    return rows
