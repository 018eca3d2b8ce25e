"""The ZeroFL comparison table for the README, from a finished sweep folder:

    python bench/zerofl_table.py runs/compare-zerofl

Per variant (mean ± sample sd over its seeds, from sweep.json): final accuracy of the served
model, uplink MB per round (10⁶ bytes the broker carried for the update frames, chunk headers
included, / rounds) and the ESTIMATED training GFLOP per round (devices × local steps × batch ×
models.methods.zerofl.train_flops_per_sample; ORT's dense kernels do not realise it), with the
accuracy difference against the SWAT baseline of the same sparsity.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from models.methods.zerofl import train_flops_per_sample
from runtime.manifest import read_manifest
from testbed.campaign import load_campaign


def _cell(stat: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    if stat.get("mean") is None:
        return "n/a"
    sd = stat.get("sd") or 0.0
    return f"{stat['mean'] * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def table(out: Path) -> str:
    sweep = json.loads((out / "sweep.json").read_text())
    runs = {r["variant"]: r for r in sweep["runs"] if r["error"] is None}
    rows = ["| variant | s | r | upload | seeds | final accuracy | Δ vs SWAT (same s) | uplink MB / round | "
            "train GFLOP / round (estimate) |", "|---|---|---|---|---|---|---|---|---|"]
    swat: dict[float, float] = {}
    lines = []
    for variant, stats in sweep["stats"].items():
        if variant not in runs:
            continue
        run = Path(runs[variant]["run"])
        c = load_campaign(run / "config.toml")
        shape = tuple(np.load(run / "eval.npz")["x"].shape[1:])
        layout = read_manifest(json.loads((run / "artifacts.json").read_text())["global"]).layout
        classes = layout.params[-1].shape[0]
        params = c.method_params if c.method == "zerofl" else None
        flops = train_flops_per_sample(params, c.model, shape, classes)["train_flops_est"]
        per_round = c.n_devices * c.local_steps * c.batch_size * flops / 1e9
        rounds = stats["rounds"]["mean"] or 1
        s = params["sparsity"] if params else None
        upload = params["upload"] if params else "dense (FedAvg)"
        acc = stats["final_accuracy"]["mean"]
        if params and upload == "dense" and acc is not None:
            swat[s] = acc
        lines.append((variant, s, params["mask_ratio"] if params else None, upload, stats, rounds, per_round))
    for variant, s, r, upload, stats, rounds, per_round in lines:
        acc = stats["final_accuracy"]["mean"]
        delta = f"{100 * (acc - swat[s]):+.1f} pt" if s in swat and acc is not None and upload != "dense" else ""
        seeds = f"{stats['final_accuracy']['n']}"
        rows.append(f"| {variant} | {'' if s is None else f'{s:g}'} | {'' if r is None else f'{r:g}'} | {upload} | "
                    f"{seeds} | {_cell(stats['final_accuracy'])} | {delta} | "
                    f"{_cell(stats['uplink_mb'], 1 / rounds)} | {per_round:.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/compare-zerofl")))
