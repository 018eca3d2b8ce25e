"""Energy bookkeeping, measured (`make bench`, section "energy").

METER. The power model driven by CPU time, as an emulated board reports it, over a known
utilisation trace (`burst_trace`: training bursts at u = 1 that start and end between 1 Hz
readings, on a slowly ramping idle level; the CPU-seconds counter is its fine quadrature), read
at 1 Hz plus a few irregular extra moments. `meter_error_pct` is the meter (backward rectangle)
against the exact energy `P_idle·T + (P_max − P_idle)·∫u dt`; `trapezoid_error_pct` is the old
rule over the same readings.

CAMPAIGN. `orchard campaign run campaigns/default.toml` into a temporary folder; per device, its
devices/<id>.csv integrated by hand (first row's cumulative energy_j, then Σ power_w · Δt) against
summary.json's energy_j (`csv_vs_summary_pct`), and the share of its energy that its accepted
tasks reported (`tasks_share`); the campaign's `wasted_fraction` of device-seconds.
"""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from runtime.board import PowerModel
from runtime.energy import CpuTimeUtilisation, EnergyMeter, ModelSource

ROOT = Path(__file__).resolve().parents[1]
BURSTS = ((1.3, 1.9), (3.2, 5.7), (7.05, 7.4), (9.5, 12.25), (14.6, 14.95))
DURATION_S = 16.0
READ_AT_S = sorted({*np.arange(0.0, DURATION_S + 0.5, 1.0).tolist(), 2.45, 6.1, 6.2, 11.0})


def burst_trace(dt_s: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(times, cumulative CPU-seconds) of the known trace on a 1-core board."""

    def u(t: float) -> float:
        return 1.0 if any(a <= t < b for a, b in BURSTS) else 0.05 + 0.02 * t

    grid = np.arange(0.0, DURATION_S + dt_s, dt_s)
    return grid, np.concatenate([[0.0], np.cumsum([u(t) * dt_s for t in grid[:-1]])])


def meter_against_exact(model: PowerModel, read_at_s: list[float]) -> tuple[float, float, float]:
    """(exact J, meter J, trapezoid-over-the-same-readings J) for the burst trace."""
    grid, cpu_cum = burst_trace()
    now = {"t": 0.0}
    clock: Callable[[], float] = lambda: now["t"]  # noqa: E731
    cpu = CpuTimeUtilisation(lambda: float(np.interp(now["t"], grid, cpu_cum)), quota_cores=1.0, clock=clock)
    meter = EnergyMeter(ModelSource(model, cpu), clock=clock)
    trapezoid, last = 0.0, None
    for t in read_at_s:
        now["t"] = t
        power_w = meter.sample().power_w
        if last is not None:
            trapezoid += 0.5 * (last[1] + power_w) * (t - last[0])
        last = (t, power_w)
    exact = model.p_idle_w * DURATION_S + (model.p_max_w - model.p_idle_w) * float(cpu_cum[-1])
    return exact, meter.energy_j, trapezoid


def csv_energy_j(path: Path) -> float:
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["power_w"]]
    # A drop in energy_j is a restarted agent: a new segment, as the report counts it.
    return float(rows[0]["energy_total_j"]) + sum(
        float(b["energy_total_j"]) if float(b["energy_total_j"]) < float(a["energy_total_j"])
        else float(b["power_w"]) * (float(b["t_s"]) - float(a["t_s"])) for a, b in itertools.pairwise(rows))


def campaign_figures(run: Path) -> dict[str, Any]:
    summary = json.loads((run / "summary.json").read_text())
    tasks_j: dict[str, float] = {}
    for line in (run / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e.get("event") == "update_accepted":
            tasks_j[e["device"]] = tasks_j.get(e["device"], 0.0) + float(e.get("energy_j") or 0.0)
    devices = []
    for d in summary["devices"]:
        by_hand = csv_energy_j(run / "devices" / f"{d['id']}.csv")
        devices.append({"id": d["id"], "energy_j": d["energy_j"], "csv_energy_j": round(by_hand, 3),
                        "csv_vs_summary_pct": round(100 * (by_hand - d["energy_j"]) / d["energy_j"], 3),
                        "tasks_share": round(tasks_j.get(d["id"], 0.0) / d["energy_j"], 3)})
    return {"devices": devices, "worst_csv_vs_summary_pct": max(abs(d["csv_vs_summary_pct"]) for d in devices),
            "wasted_fraction": summary["wasted_work"]["wasted_fraction"], "rounds": summary["rounds"]}


def run() -> dict[str, Any]:
    model = PowerModel(2.0, 7.0, "wall")
    exact, meter, trapezoid = meter_against_exact(model, READ_AT_S)
    out: dict[str, Any] = {"meter": {"exact_j": round(exact, 4), "meter_j": round(meter, 4),
                                     "meter_error_pct": round(100 * (meter - exact) / exact, 4),
                                     "trapezoid_error_pct": round(100 * (trapezoid - exact) / exact, 3)}}
    with tempfile.TemporaryDirectory(prefix="orchard-energy-") as tmp:
        run_dir = Path(tmp) / "default"
        proc = subprocess.run([sys.executable, "-m", "testbed.cli", "campaign", "run",
                               str(ROOT / "campaigns" / "default.toml"), "--out", str(run_dir), "--quiet"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            out["campaign"] = {"error": proc.stderr.strip().splitlines()[-1:]}
        else:
            out["campaign"] = campaign_figures(run_dir)
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
