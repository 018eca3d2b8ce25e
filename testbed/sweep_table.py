"""The comparison a sweep (or `campaign run --seeds`) writes: one row per variant, each figure as
mean ± sample standard deviation over its seeds, and accuracy curves as mean and min–max band.

Per run (from its run folder, so a rebuilt report gives the same table):
- final / best accuracy, time_to_target_s: the served model's (see testbed/report.py), with
  [sweep] target_accuracy when given, else the campaign's [stop] target; a seed that never
  reached it is left out of the mean and the cell says how many did ("2/3 reached").
- energy_to_target_j: the fleet's telemetry energy up to that time.
- utilization, energy_j_total, rounds: summary.json's; uplink_mb / downlink_mb: its
  bytes_up_total / bytes_down_total in 10^6 bytes.
- wasted_device_s: summary.json's `wasted_device_s` or `wasted_work.wasted_s` when the run
  recorded it, else "n/a".
- in a second table: accuracy[profile], the final accuracy of every model the server scored
  ("dense" = the global model, whether or not it is served); and per tier ([[fleet]] group):
  peak_rss_mb, step_ms (the device-reported median step) and task_step_ms (median of
  train_s / local_steps), see testbed/report.py.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from testbed import breakdown
from testbed.compare import html_page, html_table, png_figure
from testbed.report import duration_board_s
from testbed.run_data import load_run

if TYPE_CHECKING:
    from testbed.sweep import RunRecord, SweepPlan

FIGURES = ("final_accuracy", "best_accuracy", "time_to_target_s", "energy_to_target_j", "utilization",
           "wasted_device_s", "uplink_mb", "downlink_mb", "energy_j_total", "rounds")
REACHED = ("time_to_target_s", "energy_to_target_j")  # only the seeds that reached the target
GRID_POINTS = 200


def run_figures(record: RunRecord, target: float | None) -> tuple[dict[str, Any], list[tuple[float, float]]]:
    """The figures of one finished run, and its served model's (t_s, accuracy) curve."""
    from testbed.sweep import wasted_device_s

    summary = record.summary or {}
    data = load_run(record.run_dir)
    target = target if target is not None else data.target_accuracy
    curve = breakdown.served_curve(data)
    reached = next((t for t, _, a in curve if target is not None and a >= target), None)
    figures: dict[str, Any] = {k: summary.get(k) for k in FIGURES}
    for key, total in (("uplink_mb", "bytes_up_total"), ("downlink_mb", "bytes_down_total")):
        figures[key] = summary[total] / 1e6 if summary.get(total) is not None else None
    figures.update(final_accuracy=curve[-1][2] if curve else None,
                   best_accuracy=max((a for _, _, a in curve), default=None), time_to_target_s=reached,
                   energy_to_target_j=breakdown.energy_until_j(data, reached), wasted_device_s=wasted_device_s(summary),
                   served_profile=breakdown.served_profile(data), target_accuracy=target)
    for profile, accuracy in sorted(summary.get("accuracy_per_profile", {}).items()):
        figures[f"accuracy[{profile}]"] = accuracy
    for group in summary.get("groups", []):
        figures[f"peak_rss_mb[{group['group']}]"] = group.get("peak_rss_mb")
        figures[f"step_ms[{group['group']}]"] = group.get("step_ms_median")
        figures[f"task_step_ms[{group['group']}]"] = group.get("task_step_ms_median")
    return figures, [(t, a) for t, _, a in curve]


def _cell(stats: dict[str, Any], key: str, n_runs: int) -> str:
    if stats["n"] == 0:
        return "n/a"
    mean, sd = stats["mean"], stats["sd"]
    digits = 3 if abs(mean) < 10 else 1 if abs(mean) < 1e4 else 0
    text = f"{mean:,.{digits}f} ± {sd:,.{digits}f}" if stats["n"] > 1 else f"{mean:,.{digits}f}"
    if key in REACHED and stats["n"] < n_runs:
        text += f" ({stats['n']}/{n_runs} reached)"
    return text


def _band(curves: Sequence[Sequence[tuple[float, float]]], end_s: float) -> dict[str, list[float]]:
    """Each curve held from one evaluation to the next, on a common grid: the mean once every seed
    has been scored (a mean over the seeds that started first would jump), min and max as soon as
    one has (NaN before)."""
    grid = np.linspace(0.0, max(end_s, 1e-9), GRID_POINTS)
    held = np.full((len(curves), grid.size), np.nan)
    for i, curve in enumerate(curves):
        if curve:
            t = np.array([p[0] for p in curve])
            a = np.array([p[1] for p in curve])
            idx = np.searchsorted(t, grid, side="right") - 1
            held[i] = np.where(idx >= 0, a[np.clip(idx, 0, None)], np.nan)
    scored = np.isfinite(held).any(axis=0)
    mean = np.where(np.isfinite(held).all(axis=0), np.where(np.isfinite(held), held, 0.0).mean(axis=0), np.nan)
    low = np.where(scored, np.where(np.isfinite(held), held, np.inf).min(axis=0), np.nan)
    high = np.where(scored, np.where(np.isfinite(held), held, -np.inf).max(axis=0), np.nan)
    return {"t_s": grid.tolist(), "mean": mean.tolist(), "min": low.tolist(), "max": high.tolist()}


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows)]


def _json_safe(values: list[float]) -> list[float | None]:
    return [None if not math.isfinite(v) else round(v, 5) for v in values]


def write_sweep(plan: SweepPlan, records: Sequence[RunRecord], out: Path) -> dict[str, Any]:
    """Write sweep.md, sweep.csv, sweep.json, sweep_accuracy.png and sweep.html into `out`."""
    from testbed.plots import plot_bands
    from testbed.sweep import records_json, spread, write_json

    per_run: dict[str, list[dict[str, Any]]] = {}
    curves: dict[str, list[list[tuple[float, float]]]] = {}
    ends: list[float] = []
    for record in records:
        label = record.variant or "campaign"
        per_run.setdefault(label, [])
        curves.setdefault(label, [])
        if record.summary is None:
            continue
        figures, curve = run_figures(record, plan.target_accuracy)
        per_run[label].append({"seed": record.seed, **figures})
        curves[label].append(curve)
        ends.append(duration_board_s(record.summary))
    keys = list(dict.fromkeys(k for runs in per_run.values() for run in runs for k in run
                              if k not in ("seed", "served_profile", "target_accuracy")))
    rows, stats = [], {}
    for label, runs in per_run.items():
        n_runs = sum(1 for r in records if (r.variant or "campaign") == label)
        stats[label] = {k: spread([run.get(k) for run in runs]) for k in keys}
        failed = n_runs - len(runs)
        rows.append({"variant": label, "seeds": f"{len(runs)}/{n_runs}" + (f" ({failed} failed)" if failed else ""),
                     "serves": ", ".join(sorted({str(r["served_profile"]) for r in runs})) or "n/a",
                     **{k: _cell(stats[label][k], k, len(runs)) for k in keys}})
    columns = ["variant", "seeds", "serves", *keys]
    end_s = max(ends, default=0.0)
    bands = {label: _band(c, end_s) for label, c in curves.items() if any(c)}
    targets = {run.get("target_accuracy") for runs in per_run.values() for run in runs} - {None}
    png = plot_bands(bands, out / "sweep_accuracy.png", target=targets.pop() if len(targets) == 1 else None)
    scored = sorted(k for k in keys if k.startswith("accuracy["))
    tiers = [k for k in keys if "[" in k and k not in scored]
    md = [*_markdown(rows, [c for c in columns if "[" not in c]), "", "Final accuracy of every model scored:", "",
          *_markdown(rows, ["variant", *scored]), "", "Per tier:", "", *_markdown(rows, ["variant", *tiers])]
    (out / "sweep.md").write_text("\n".join(md) + "\n")
    with (out / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["variant", "seed", "served_profile", "target_accuracy", *keys])
        writer.writeheader()
        writer.writerows({"variant": label, **{k: ("" if v is None else v) for k, v in run.items()}}
                         for label, runs in per_run.items() for run in runs)
    payload = {"source": str(plan.source), "seeds": list(plan.seeds), "target_accuracy": plan.target_accuracy,
               "runs": records_json(records), "stats": stats, "per_run": per_run,
               "host_wall_s_total": round(sum(r.wall_s for r in records), 1),
               "bands": {k: {**{n: _json_safe(v) for n, v in b.items() if n != "t_s"}, "t_s": b["t_s"]}
                         for k, b in bands.items()}}
    write_json(out / "sweep.json", payload)
    note = ("<p>Each cell: mean ± sample standard deviation over the seeds that finished; "
            "time to target over the seeds that reached it. The curve: mean (once every seed is scored), "
            "band: min–max.</p>")
    (out / "sweep.html").write_text(html_page("Orchard sweep", "<h1>Orchard sweep: " + str(plan.source) + "</h1>"
                                              + note + html_table(rows, columns) + png_figure(png)))
    return payload
