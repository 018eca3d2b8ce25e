"""`make bench`: measure, never assert. Writes bench.json with every figure and prints a table.

Sections (each can be run alone with --only NAME):
- trainer: median step time and peak RSS of the device trainer for the VGG-style CNN on
  32x32x3 and LeNet-5 on 8x8 digits, at widths 1.0/0.75/0.5/0.25 and 1 and 2 threads, with the
  measured speed-up next to the FLOPs ratio. Each point runs in a fresh process that imports
  only the runtime (bench/trainer_probe.py), as a board would, so peak RSS is the trainer's.
- further sections are registered by the modules that own them (aggregation, mqtt, engine).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDTHS = (1.0, 0.75, 0.5, 0.25)
THREADS = (1, 2)
TRAINER_CASES = (("cnn", (3, 32, 32), 10, 32), ("lenet", (1, 8, 8), 10, 32))


def bench_trainer(steps: int = 40) -> dict[str, Any]:
    from models.artifacts import ensure_artifacts
    from models.builder import build
    from models.structure import full_structure, sub_structure
    from runtime.profile import Profile
    from runtime.submodel import index_map_for

    rows = []
    for model, shape, classes, batch in TRAINER_CASES:
        full = full_structure(model, shape, classes)
        groups = build(full).layout.groups
        for threads in THREADS:
            base: dict[str, Any] | None = None
            for width in WIDTHS:
                directory = ensure_artifacts(sub_structure(full, index_map_for(Profile(width=width), groups))).directory
                proc = subprocess.run(
                    [sys.executable, str(ROOT / "bench" / "trainer_probe.py"), "--artifact", str(directory),
                     "--threads", str(threads), "--steps", str(steps), "--batch", str(batch)],
                    capture_output=True, text=True, check=True,
                )
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                base = base or r
                flops_ratio = base["flops_per_sample"] / r["flops_per_sample"]
                speedup = base["step_ms_median"] / r["step_ms_median"]
                rows.append({
                    "model": model, "input_shape": list(shape), "batch": batch, "threads": threads, "width": width,
                    "params": r["params"], "flops_per_sample": r["flops_per_sample"],
                    "step_ms_median": round(r["step_ms_median"], 3),
                    "overhead_ms_median": round(r["overhead_ms_median"], 4),
                    "peak_rss_mb": round(r["peak_rss_mb"], 1),
                    "flops_speedup": round(flops_ratio, 2), "measured_speedup": round(speedup, 2),
                    "fraction_of_flops_speedup": round(speedup / flops_ratio, 3),
                })
                print(f"  trainer {model:<6} threads={threads} width={width:<5} step {r['step_ms_median']:8.2f} ms"
                      f"  (outside ORT {r['overhead_ms_median']:.3f})  speed-up {speedup:5.2f} of {flops_ratio:5.2f}"
                      f"  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    return {"rows": rows}


def _optional(module: str, func: str = "run") -> Callable[[], dict[str, Any]]:
    def call() -> dict[str, Any]:
        fn = getattr(importlib.import_module(module), func)
        result: dict[str, Any] = fn()
        return result

    return call


SECTIONS: dict[str, Callable[[], dict[str, Any]]] = {
    "trainer": bench_trainer,
    "aggregation": _optional("bench.aggregation_bench"),
    "engine": _optional("bench.engine_bench"),
    "staleness": _optional("bench.staleness_bench"),
    "energy": _optional("bench.energy_bench"),
    "mqtt": _optional("bench.mqtt_bench"),
    "federation": _optional("bench.federation_bench"),
    "fidelity": _optional("bench.fidelity_bench"),
    "testbed": _optional("bench.testbed_bench"),
    "fjord": _optional("bench.fjord_bench"),
    "mpsl_transport": _optional("bench.mpsl_transport_bench"),
    "zerofl": _optional("bench.zerofl_bench"),
    "netshape": _optional("bench.netshape_bench"),
    "distreal": _optional("bench.distreal_bench"),
    "startup": _optional("bench.startup_bench"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench.json")
    p.add_argument("--only", nargs="*", choices=sorted(SECTIONS))
    args = p.parse_args()
    out: dict[str, Any] = {
        "host": {"machine": platform.machine(), "processor": platform.processor(), "cores": os.cpu_count(),
                 "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for name in args.only or list(SECTIONS):
        if not (ROOT / "bench" / f"{name}_bench.py").exists() and name != "trainer":
            continue
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        out[name] = SECTIONS[name]()
        out[name]["bench_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
