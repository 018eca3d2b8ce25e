"""Device start-up, before and after, interleaved: another revision (default `main`) against this
checkout, on startup_bench.py's device part for one board (default the Zero 2 W, the tightest).

    python bench/startup_ab.py [REV] [RUNS] [BOARD]

The revision is exported with `git archive` into a temporary folder and run from there with its
own bench/startup_bench.py (its runtime, its launch flags); each run is one federation with
DEVICE_REPS = 2 cold and 2 warm starts at the board's quota, runs alternating old / new, RUNS of
each (default 2). Prints per run and side: hello and cgroup CPU by the hello (cold and warm
medians), the agent's CPU marks, and the 1-minute load. Needs root (cgroups) and mosquitto;
about 1.5 min per run on a loaded host.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_RUN = """
import importlib.util, json, sys
from pathlib import Path
root, board, out = sys.argv[1], sys.argv[2], sys.argv[3]
spec = importlib.util.spec_from_file_location("sb", f"{root}/bench/startup_bench.py")
sb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sb)
sb.DEVICE_BOARDS, sb.OTHER_BOARDS, sb.DEVICE_REPS, sb.OUT = (board,), (), 2, Path(out)
print(json.dumps(sb.bench_device()["boards"][board]))
"""


def _one(root: Path, board: str, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _RUN, str(root), board, str(out)], cwd=root, check=True,
                          capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    rev = sys.argv[1] if len(sys.argv) > 1 else "main"
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    board = sys.argv[3] if len(sys.argv) > 3 else "rpi-zero2w"
    with tempfile.TemporaryDirectory(prefix="startup-ab-") as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        for i in range(runs):
            for side, root in (("old", old), ("new", ROOT)):
                row = _one(root, board, Path(tmp) / f"out-{side}{i}")
                for kind in ("cold", "warm"):
                    m = row[kind].get("marks_s", {})
                    marks = " ".join(f"{k[4:]}={v}" for k, v in m.items() if k.startswith("cpu_"))
                    print(f"{side} {rev if side == 'old' else 'this'} run {i} {board} {kind}: hello "
                          f"{row[kind]['hello_s']} s, cgroup CPU {row[kind]['cgroup_cpu_s_at_hello']} s, load "
                          f"{row[kind]['loadavg_1m']}; agent CPU s at {marks}", flush=True)


if __name__ == "__main__":
    main()
