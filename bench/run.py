"""`make bench`: measure, never assert. Writes bench.json with every figure and prints a table.

Sections (each can be run alone with --only NAME):
- sections are registered by the modules that own them (bench/<name>_bench.py: trainer,
  aggregation, mqtt, engine, ...).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def _optional(module: str, func: str = "run") -> Callable[[], dict[str, Any]]:
    def call() -> dict[str, Any]:
        fn = getattr(importlib.import_module(module), func)
        result: dict[str, Any] = fn()
        return result

    return call


SECTIONS: dict[str, Callable[[], dict[str, Any]]] = {
    "trainer": _optional("bench.trainer_bench"),
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
        if not (ROOT / "bench" / f"{name}_bench.py").exists():
            continue
        print(f"[{name}]", flush=True)
        t0, load_start = time.perf_counter(), os.getloadavg()[0]
        out[name] = SECTIONS[name]()
        out[name]["bench_s"] = round(time.perf_counter() - t0, 1)
        # The host is shared: every section's figures go with the load they were measured at.
        out[name]["loadavg_1m_start"] = round(load_start, 2)
        out[name]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
