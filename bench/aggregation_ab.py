"""Own-index-set merges, before and after, interleaved in one process: another revision's
`server/accumulate.py` (default `main`) against this checkout's, on `aggregation_bench.py`'s
own-set cases (same contributions, same merge policies, same validation in server/aggregate.py).

    python bench/aggregation_ab.py [REV] [REPEATS]

The old side gets frozen int64 copies of the index arrays, as main's engine cache and admission
left them (before indices were kept int32); this side the frozen int32 arrays the engine and
admission now keep. Both sides run this checkout's validation (`server/aggregate.py`), which
checks a frozen array once. Prints one line per case: median CPU ms of
each side, each as a fraction of a memcpy of the same values (measured in the same loop), the
speed-up, the largest difference between the two results, each side's `peak_extra_mb` (as in
aggregation_bench.py: a first merge, pooled buffers included), and the 1-minute load average.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.aggregation_bench as ab
import server.aggregate as agg
from server.aggregate import UpdateContribution
from server.policies import MaskedDeltaMerge, PerElementMerge

CASES = [("per_element_random", "random_half", PerElementMerge().merge),
         ("per_element_classes", "own_classes", PerElementMerge().merge),
         ("masked_own", "own_masks", MaskedDeltaMerge().merge),
         ("sparse", "sparse", MaskedDeltaMerge().merge)]


def load_revision(rev: str) -> object:
    source = subprocess.run(["git", "show", f"{rev}:server/accumulate.py"], check=True, capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    path = Path(tempfile.mkdtemp()) / "accumulate_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("accumulate_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["accumulate_before"] = module
    spec.loader.exec_module(module)
    return module


def compare(before: object, merge: object, g: np.ndarray, new: list[UpdateContribution],
            repeats: int) -> tuple[float, float, float, float, float, float]:
    """(before s, after s, memcpy s, max |after - before|, before and after peak MB of a first
    merge), times as medians over `repeats`, interleaved."""
    after_sums = agg.coverage_sums
    old = [UpdateContribution(None if c.indices is None else _frozen64(c.indices), c.values, c.weight,
                              c.coord_weights) for c in new]
    dest = np.empty(g.size, np.float32)

    def copy_all() -> None:
        for c in new:
            np.copyto(dest[: c.size], c.values)

    def side(sums: object, cs: list[UpdateContribution]) -> np.ndarray:
        agg.coverage_sums = sums  # type: ignore[assignment]
        try:
            return merge(g, cs)  # type: ignore[operator,no-any-return]
        finally:
            agg.coverage_sums = after_sums

    first_old, first_new = side(before.coverage_sums, old), side(after_sums, new)  # type: ignore[attr-defined]
    t_old, t_new, t_copy = [], [], []
    for _ in range(repeats):
        t_old.append(ab._cpu_s(lambda: side(before.coverage_sums, old)))  # type: ignore[attr-defined]
        t_new.append(ab._cpu_s(lambda: side(after_sums, new)))
        t_copy.append(ab._cpu_s(copy_all))
    diff = float(np.abs(first_old.astype(np.float64) - first_new).max())
    before.release()  # type: ignore[attr-defined]  # its pool too: each side's first merge allocates
    peak_old = ab._peak_extra_mb(lambda: side(before.coverage_sums, old))  # type: ignore[attr-defined]
    before.release()  # type: ignore[attr-defined]
    peak_new = ab._peak_extra_mb(lambda: side(after_sums, new))
    return (statistics.median(t_old), statistics.median(t_new), statistics.median(t_copy), diff, peak_old,
            peak_new)


def _frozen64(idx: np.ndarray) -> np.ndarray:
    wide = idx.astype(np.int64)
    wide.flags.writeable = False
    return wide


def main(rev: str = "main", repeats: int = 7) -> None:
    before = load_revision(rev)
    rng = np.random.default_rng(0)
    n, leading, layout = ab.model_layout()
    g = rng.standard_normal(n, dtype=np.float32)
    for name, kind, merge in CASES:
        mo, mn, mc, diff, po, pn = compare(before, merge, g, ab._contributions(rng, n, kind, leading, layout),
                                   repeats)
        print(f"{name:20s} before {mo * 1e3:7.1f} ms ({mc / mo:.3f} of memcpy)  after {mn * 1e3:7.1f} ms "
              f"({mc / mn:.3f})  speed-up {mo / mn:.2f}x  max|after-before| {diff:.2e}  "
              f"peak +{po:.0f} / +{pn:.0f} MB  load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "main", int(sys.argv[2]) if len(sys.argv) > 2 else 7)
