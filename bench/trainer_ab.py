"""Before/after of the device trainer: another checkout's code and artifacts (`--before`, e.g.
`git archive main | tar -x -C /tmp/before`) against this one, interleaved per point, 3 runs each,
median CPU ms per step at one thread (each tree's own bench/trainer_probe.py, 40 steps). Torch is
hidden from both probes, as on a board. Not part of `make bench`: it needs the second tree.
Prints one JSON line per point."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [("cnn", w) for w in (1.0, 0.75, 0.5, 0.25)] + [("lenet", w) for w in (1.0, 0.75, 0.5, 0.25)] + [
    ("mlp", 1.0), ("mlp", 0.25), ("resnet", 1.0), ("resnet", 0.25)]
ARTIFACT = """import sys; sys.path.insert(0, sys.argv[1])
from models.artifacts import ensure_artifacts
from models.builder import build
from models.structure import full_structure, sub_structure
from runtime.profile import Profile
from runtime.submodel import index_map_for
m, w = sys.argv[2], float(sys.argv[3])
full = full_structure(m, (3, 32, 32) if m in ("cnn", "resnet") else (1, 8, 8), 10)
print(ensure_artifacts(sub_structure(full, index_map_for(Profile(width=w), build(full).layout.groups))).directory)"""
NO_TORCH = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--before", required=True, help="root of the other checkout")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="*", default=[], help="only these models' points (default: all)")
    a = p.parse_args()
    trees = {"before": str(Path(a.before).resolve()), "after": str(ROOT)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for model, width in CASES:
        if a.models and model not in a.models:
            continue
        dirs = {k: subprocess.run([sys.executable, "-c", ARTIFACT, t, model, str(width)], capture_output=True,
                                  text=True, check=True, cwd=t).stdout.split()[-1] for k, t in trees.items()}
        cpu: dict[str, list[float]] = {k: [] for k in trees}
        for _ in range(a.repeats):
            for k, t in trees.items():
                out = subprocess.run([sys.executable, "-c", NO_TORCH, f"{t}/bench/trainer_probe.py", "--artifact",
                                      dirs[k], "--steps", "40"], capture_output=True, text=True, check=True, cwd=t,
                                     env=env).stdout
                cpu[k].append(json.loads(out.strip().splitlines()[-1])["cpu_ms_per_step"])
        row = {"model": model, "width": width, "loadavg_1m": round(os.getloadavg()[0], 2),
               **{f"{k}_cpu_ms": round(statistics.median(v), 4) for k, v in cpu.items()}}
        row["after_over_before"] = round(row["after_cpu_ms"] / row["before_cpu_ms"], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
