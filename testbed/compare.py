"""Compare several runs: the served model's accuracy overlaid (PNG) and a table of headline figures (md, csv, html).

The run folders are only read, never written: comparing must not change what a run's own report
says. Each run is labelled "campaign / strategy"; when two labels collide the folder name is added.
"""

from __future__ import annotations

import base64
import csv
import html
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError
from testbed.report import summarise
from testbed.run_data import load_run

COLUMNS = ("label", "run", "campaign", "strategy", "n_devices", "rounds", "duration_board_s", "served_profile",
           "final_accuracy", "best_accuracy", "target_accuracy", "time_to_target_s", "energy_to_target_j",
           "updates_accepted", "updates_rejected", "utilization", "train_s_total", "energy_j_total",
           "bytes_up_total", "bytes_down_total", "throttle_backend")


def _labels(summaries: list[dict[str, Any]], runs: list[Path]) -> list[str]:
    base = [f"{s['campaign']} / {s['strategy'] or '?'}" for s in summaries]
    counts = Counter(base)
    return [f"{b} ({run.name})" if counts[b] > 1 else b for b, run in zip(base, runs, strict=True)]


CSS = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
       "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f1f3f5}"
       ".warn{background:#ffe3e3;border:2px solid #e03131;padding:1em;font-weight:bold}"
       ".note{background:#fff9db;padding:.5em}img{max-width:100%}pre{background:#f8f9fa;padding:1em}")


def format_cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(row.get(c)))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def png_figure(path: Path) -> str:
    """The PNG inlined as a data URI: the page is one file that can be mailed or attached."""
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(path.name)}</figcaption></figure>")


def html_page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(format_cell(row[c]).replace("|", "\\|") for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def compare_runs(runs: list[Path], out_dir: Path) -> dict[str, Any]:
    """Write compare_accuracy.png, compare.md, compare.csv and compare.html (self-contained) into
    `out_dir`; returns {"columns": [...], "rows": [{column: value}, ...], "files": [...]}.
    ConfigError (one line) when `runs` is empty or a folder is not a run folder."""
    from testbed.breakdown import served_curve
    from testbed.plots import plot_overlay

    if not runs:
        raise ConfigError("compare needs at least one run folder")
    runs = [Path(r) for r in runs]
    loaded = [load_run(r) for r in runs]  # every folder is checked before anything is written
    summaries = [summarise(d) for d in loaded]
    rows = [{"label": label, **{c: s.get(c) for c in COLUMNS if c != "label"}}
            for label, s in zip(_labels(summaries, runs), summaries, strict=True)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = []
    for row, data in zip(rows, loaded, strict=True):
        curve = served_curve(data)  # the model each run serves, as in its summary
        series.append((str(row["label"]), [t for t, _, _ in curve], [a for _, _, a in curve], [v for _, v, _ in curve]))
    targets = {d.target_accuracy for d in loaded if d.target_accuracy is not None}
    png = plot_overlay(series, out_dir / "compare_accuracy.png", target=targets.pop() if len(targets) == 1 else None)
    (out_dir / "compare.md").write_text(_markdown(rows))
    with (out_dir / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: "" if row[c] is None else row[c] for c in COLUMNS} for row in rows)
    page = "<h1>Orchard comparison</h1>" + html_table(rows, COLUMNS) + png_figure(png)
    (out_dir / "compare.html").write_text(html_page("Orchard comparison", page))
    files = [png.name, "compare.md", "compare.csv", "compare.html"]
    return {"columns": list(COLUMNS), "rows": rows, "files": files}
