"""Aggregation throughput: how fast the server merges one round of 100 updates of a ~1M-parameter
float32 model, next to a plain memory copy of the same bytes.

The model is the VGG-style CNN on 32x32x3 with every channel group widened 1.3x (994,263 float32
parameters, ~4 MB), so the submodel index sets below are the real ones `runtime.submodel` makes.
Cases, each one call of the server's merge (the `MergePolicy` the strategies use, which runs the
validation in `server/aggregate.py` as part of the merge, as the engine does):
  * dense:                DenseMerge (`apply_deltas` on L1-normalised weights): FedAvg of full deltas;
  * fedavg_weights:       `weighted_average` of full weight vectors (the textbook FedAvg form);
  * per_element_random:   PerElementMerge (`per_element_delta`), each update covers a random half;
  * per_element_leading:  PerElementMerge, each update is a leading-width 0.7 submodel (HeteroFL,
                          50% of the coordinates, strided through every tensor);
  * sparse:               MaskedDeltaMerge (Co-S²P / ZeroFL) with each update at a random ~10%;
  * robust_* (server/robust.py, through `robust_merge` as the engine calls it, over the dense
    deltas): norm_clip (clip to 3x the lower-median norm, then DenseMerge), median, trimmed_mean
    (beta 0.2), krum (f=10, Multi-Krum m=50), and median_leading (median over the leading-0.7
    submodels, NaN-aware per coordinate).
Reference (`memcpy`): `np.copyto` of every update's values into a preallocated buffer: the bytes
the merge has to read at least once, moved at this machine's memory bandwidth.

Timing is CPU time of this process (`time.process_time`, all threads), not wall time: the host is
shared, and a merge is single-threaded numpy. Merge and memcpy repetitions alternate (A, B, A, B,
...) so both see the same load; each figure is the median over `repeats`, and the 1-minute load
average is recorded next to it. Submodel index arrays are frozen (read-only) as the engine's
assignment cache freezes them (`Engine.assignment_for`), and sparse uploads' indices (ZeroFL top-k,
Co-S²P masks) as admission freezes them once it has checked them (`server/admission.py`), so a
merge skips re-checking them; both are int32, as `check_indices` narrows them.

Figures: `update_mb` (values only, MB = 1e6 bytes; `index_mb` is the index bytes on top, int32
as the engine and admission keep them for a model under 2**31 parameters),
median CPU seconds over `repeats`, MB/s of update values, the memcpy MB/s of the same bytes,
`fraction_of_memcpy` = merge MB/s / memcpy MB/s, and `peak_extra_mb`: the most memory the merge
held at once beyond its inputs, in a first merge (tracemalloc, which sees numpy's buffers; the 4 MB
result included; the buffers `server/accumulate.py` pools between merges are counted, as a first
merge allocates them), and `max_err_eps32`: for the plain merges, the largest difference from the
same formula in float64 update by update, in float32 epsilons of each coordinate's scale (|W| +
the merge of |values|); float32 rounding of the result alone is up to 0.5.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from server import accumulate
from server import aggregate as agg
from server.accumulate import release
from server.aggregate import FloatArray, UpdateContribution, weighted_average
from server.policies import DenseMerge, MaskedDeltaMerge, PerElementMerge
from server.robust import RobustConfig, robust_merge

N_UPDATES = 100
REPEATS = 7
WIDTH_SCALE = 1.3  # cnn channels x1.3 -> 994,263 parameters
LEADING_WIDTH = 0.7  # covers ~50% of the coordinates
SPARSE_FRACTION = 0.10
OWN_WIDTH = 0.7  # per-device channel subsets: ~49% of the coordinates
MB = 1e6


def model_layout() -> tuple[int, np.ndarray, Any]:
    """(n_params, flat indices of the leading-width submodel, the ParamLayout) of the widened CNN."""
    from models.builder import build
    from models.structure import BASE_CHANNELS, Structure
    from runtime.profile import Profile
    from runtime.submodel import Submodel, index_map_for

    channels = {k: round(v * WIDTH_SCALE) for k, v in BASE_CHANNELS["cnn"].items()}
    built = build(Structure("cnn", (3, 32, 32), {**channels, "classes": 10}))
    sub = Submodel.of(built.layout, index_map_for(Profile(width=LEADING_WIDTH), built.layout.groups))
    return built.layout.total, sub.indices, built.layout


def own_channels(rng: np.random.Generator, layout: Any) -> np.ndarray:
    """A per-device submodel: ⌈0.7·C⌉ random channels of every hidden group and 3 of the 10
    classes, as Chen & Qin's class-relevant filter sets and Co-S²P's unit masks are (sorted
    flat indices with long runs: the trailing axes of each kept channel are contiguous)."""
    from runtime.submodel import Submodel, kept_channels

    def kept(group: str, channels: int) -> int:
        return 3 if group == "classes" else kept_channels(OWN_WIDTH, channels)

    index_map = {g: np.sort(rng.choice(c, kept(g, c), replace=False)).astype(np.int64)
                 for g, c in layout.groups.items()}
    return Submodel.of(layout, index_map).indices


def _cpu_s(fn: Callable[[], object]) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def _interleaved(merge: Callable[[], object], values: list[FloatArray], repeats: int) -> tuple[float, float]:
    """Median CPU seconds of `merge` and of copying `values`, alternating the two."""
    dest = np.empty(max(v.size for v in values), dtype=np.float32)

    def copy_all() -> None:
        for v in values:
            np.copyto(dest[: v.size], v)

    merge()  # warm-up: page faults of first-touch buffers, allocator pools
    copy_all()
    merge_s, copy_s = [], []
    for _ in range(repeats):
        merge_s.append(_cpu_s(merge))
        copy_s.append(_cpu_s(copy_all))
    return statistics.median(merge_s), statistics.median(copy_s)


def _peak_extra_mb(merge: Callable[[], object]) -> float:
    release()  # the merge's pooled buffers count: measure a first merge
    gc.collect()
    tracemalloc.start()
    try:
        merge()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / MB


# The float64 formula each plain case computes: (per-element normalisation, weights L1-normalised
# over the round, W added). The robust rules are exact (sorts and float64 sums) and have none.
FORMS = {"dense": (False, True, True), "fedavg_weights": (False, True, False),
         "per_element_random": (True, False, True), "per_element_leading": (True, False, True),
         "per_element_classes": (True, False, True), "masked_own": (False, True, True),
         "sparse": (False, True, True)}


def _float64_merge(g: FloatArray, contributions: list[UpdateContribution], per_element: bool,
                   normalised: bool, add_global: bool, magnitude: bool = False) -> np.ndarray:
    """The merge in float64, update by update; `magnitude`: the same of |W| and |values|, the
    scale against which the float32 rounding is measured."""
    total = sum(c.weight for c in contributions) if normalised else 1.0
    num, den = np.zeros(g.size), np.zeros(g.size)
    for c in contributions:
        v = c.values.astype(np.float64)
        idx = slice(None) if c.indices is None else c.indices
        gamma = c.weight / total * (1.0 if c.coord_weights is None else c.coord_weights.astype(np.float64))
        num[idx] += gamma * (np.abs(v) if magnitude else v)
        den[idx] += gamma
    if per_element:
        np.divide(num, den, out=num, where=den > 0)
    base = np.abs(g.astype(np.float64)) if magnitude else g.astype(np.float64)
    return base + num if add_global else num


def _max_err_eps32(name: str, g: FloatArray, contributions: list[UpdateContribution], got: FloatArray) -> float | None:
    """max over coordinates of |merge − float64 formula| in float32 epsilons of that coordinate's scale."""
    if name not in FORMS:
        return None
    ref = _float64_merge(g, contributions, *FORMS[name])
    scale = _float64_merge(g, contributions, *FORMS[name], magnitude=True)
    err = np.abs(got.astype(np.float64) - ref) / (np.finfo(np.float32).eps * np.maximum(scale, 1e-30))
    return round(float(err.max()), 3)


def _contributions(rng: np.random.Generator, n: int, kind: str, leading: np.ndarray,
                   layout: Any = None) -> list[UpdateContribution]:
    out = []
    for i in range(N_UPDATES):
        cw = None
        if kind == "dense":
            idx = None
        elif kind in ("own_classes", "own_masks"):
            idx = own_channels(rng, layout)
        elif kind == "random_half":
            idx = np.sort(rng.permutation(n)[: n // 2]).astype(np.int64)
        elif kind == "leading":
            idx = leading  # the same tier for every update, as a HeteroFL fleet of one tier would send
        else:
            idx = np.sort(rng.choice(n, int(n * SPARSE_FRACTION), replace=False)).astype(np.int64)
        if idx is not None and kind != "leading":  # per-device assignments (Chen & Qin) as the engine's
            idx = agg.frozen_indices(idx, n, "bench")  # cache keeps them, sparse uploads as admission does:
            # checked once, int32 (the model's index type), read-only
        size = n if idx is None else idx.size
        values = (rng.standard_normal(size, dtype=np.float32) * 0.01).astype(np.float32)
        if kind == "own_classes":  # Chen & Qin's harvest: a weight per coordinate (served classes' samples)
            cw = rng.uniform(1.0, 100.0, size).astype(np.float32)
        out.append(UpdateContribution(idx, values, float(50 + i % 50), cw))
    return out


ROBUST_CASES = [
    ("norm_clip", "dense", DenseMerge(), RobustConfig(norm_bound="clip")),
    ("median", "dense", DenseMerge(), RobustConfig(robust_merge="median")),
    ("trimmed_mean", "dense", DenseMerge(), RobustConfig(robust_merge="trimmed-mean")),
    ("krum", "dense", DenseMerge(), RobustConfig(robust_merge="krum", krum_byzantine=10, krum_select=50)),
    ("median_leading", "leading", PerElementMerge(), RobustConfig(robust_merge="median")),
]


def _robust(policy: Any, cfg: RobustConfig) -> Callable[[FloatArray, list[UpdateContribution]], FloatArray]:
    return lambda g, c: robust_merge(g, c, policy, cfg)[0]


KERNEL_UPDATES = 16  # one partial sum's worth of own-set updates


def scatter_kernels(rng: np.random.Generator, n: int, repeats: int) -> list[dict[str, Any]]:
    """ns per value of `out[idx] += w · v` over 16 updates, each its own sorted random half of
    `n` (unique indices), for each scatter candidate, interleaved with a memcpy of the values;
    then the per-element merges' sums AND counts (`num[idx] += w · v`, `den[idx] += w`) per
    value, by each one-pass candidate against the two scatters the merges run."""
    idxs = [np.sort(rng.permutation(n)[: n // 2]).astype(np.int64) for _ in range(KERNEL_UPDATES)]
    idxs32 = [i.astype(np.int32) for i in idxs]
    vals = [rng.standard_normal(i.size, dtype=np.float32) for i in idxs]
    ws = [np.float32(50 + k) for k in range(KERNEL_UPDATES)]
    out32, out64, den32 = np.zeros(n, np.float32), np.zeros(n), np.zeros(n, np.float32)
    dest = np.empty(n // 2, np.float32)

    def each(fn: Callable[[np.ndarray, np.ndarray, np.float32], object],
             index: list[np.ndarray] = idxs) -> Callable[[], None]:
        def all_updates() -> None:
            for i, v, w in zip(index, vals, ws, strict=True):
                fn(i, v, w)
        return all_updates

    def take_put(i: np.ndarray, v: np.ndarray, w: np.float32) -> None:
        t = np.take(out32, i, mode="clip")  # mode="clip": no buffered copy; indices are checked
        t += v * w
        np.put(out32, i, t, mode="clip")

    def fancy(i: np.ndarray, v: np.ndarray, w: np.float32) -> None:
        out32[i] += v * w

    mask = np.zeros(n, dtype=bool)

    def bool_mask(i: np.ndarray, v: np.ndarray, w: np.float32) -> None:  # sorted indices = mask order
        mask.fill(False)
        mask[i] = True
        out32[mask] += v * w

    def bincount() -> None:  # one pass over the concatenated round, float64 weights
        out64.__iadd__(np.bincount(np.concatenate(idxs), weights=np.concatenate([v * w for v, w in zip(
            vals, ws, strict=True)]), minlength=n))

    kernels: dict[str, Callable[[], None]] = {
        "memcpy": each(lambda i, v, w: np.copyto(dest[: v.size], v)),
        "np_add_at": each(lambda i, v, w: accumulate._scatter_add_numpy(out32, i, v, w)),
        "fancy_iadd": each(fancy), "take_put": each(take_put), "bool_mask": each(bool_mask),
        "bincount_concat": bincount,
    }
    if accumulate.scatter_add is accumulate._scatter_add_csc:  # scipy imported: the merges' kernel
        kernels["scipy_csc"] = each(lambda i, v, w: accumulate._scatter_add_csc(out32, i, v, w))
        kernels["scipy_csc_int32"] = each(lambda i, v, w: accumulate._scatter_add_csc(out32, i, v, w), idxs32)
        kernels.update(_sums_and_counts(n, idxs32, vals, ws, out32, den32, each))
    for fn in kernels.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in kernels}
    for _ in range(repeats):
        for name, fn in kernels.items():
            times[name].append(_cpu_s(fn))
    values = sum(v.size for v in vals)
    copy_ns = statistics.median(times["memcpy"]) / values * 1e9
    rows = []
    for name, ts in times.items():
        ns = statistics.median(ts) / values * 1e9
        rows.append({"kernel": name, "ns_per_value": round(ns, 3), "memcpy_ns_per_value": round(copy_ns, 3),
                     "fraction_of_memcpy": round(copy_ns / ns, 4), "loadavg_1m": round(os.getloadavg()[0], 2)})
        print(f"  aggregation kernel {name:<30} {ns:6.2f} ns/value; memcpy {copy_ns:.2f}; ratio {copy_ns / ns:.3f}",
              flush=True)
    return rows


def _sums_and_counts(n: int, idxs: list[np.ndarray], vals: list[FloatArray], ws: list[np.float32],
                     num: FloatArray, den: FloatArray, each: Any) -> dict[str, Callable[[], None]]:
    """Sums and counts of own-set updates per value (int32 indices): the merges' two scatters,
    and the one-pass forms scipy's kernels allow. Each one-pass form needs a per-value pair
    (w·v, w) the kernel multiplies by one coefficient, so it first writes that pair per value."""
    from scipy.sparse._sparsetools import csc_matvec, csc_matvecs

    m = max(i.size for i in idxs)
    ones = np.ones(m, np.float32)
    pairs = np.empty((m, 2), np.float32)  # (w·v, w) per value, for the (n, 2) interleaved target
    both = np.zeros((n, 2), np.float32)
    columns = np.arange(m + 1, dtype=np.int32)  # one CSC column per value
    packed = np.empty(m, np.complex64)  # v + 1j per value: real part the sum, imaginary the count
    packed.imag = 1.0
    cplx = np.zeros(n, np.complex64)

    def two(i: np.ndarray, v: np.ndarray, w: np.float32) -> None:
        accumulate._scatter_add_csc(num, i, v, w)
        accumulate._scatter_add_csc(den, i, ones[: i.size], w)

    def interleaved(i: np.ndarray, v: np.ndarray, w: np.float32) -> None:
        p = pairs[: i.size]
        np.multiply(v, w, out=p[:, 0])
        p[:, 1] = w
        csc_matvecs(n, i.size, 2, columns[: i.size + 1], i, ones[: i.size], p, both)

    def complex64(i: np.ndarray, v: np.ndarray, w: np.float32) -> None:
        a = packed[: i.size]
        np.copyto(a.real, v)
        csc_matvec(n, 1, np.array([0, i.size], np.int32), i, a, np.array([w], np.complex64), cplx)

    def counts_by_bincount() -> None:  # sums scattered; counts from one bincount over the round
        for i, v, w in zip(idxs, vals, ws, strict=True):
            accumulate._scatter_add_csc(num, i, v, w)
        den64 = np.bincount(np.concatenate(idxs), weights=np.repeat(np.array(ws, np.float64), [i.size for i in idxs]),
                            minlength=n)
        np.add(den, den64, out=den, casting="unsafe")

    return {"sums_counts_two_csc_int32": each(two, idxs), "sums_counts_interleaved": each(interleaved, idxs),
            "sums_counts_complex64": each(complex64, idxs), "sums_counts_bincount": counts_by_bincount}


def run(repeats: int = REPEATS) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    n, leading, layout = model_layout()
    leading = agg.frozen_indices(leading, n, "leading")  # as the engine's assignment cache keeps it
    global_flat = rng.standard_normal(n, dtype=np.float32)
    cases: list[tuple[str, str, Callable[[FloatArray, list[UpdateContribution]], FloatArray]]] = [
        ("dense", "dense", DenseMerge().merge),
        ("fedavg_weights", "dense", weighted_average),
        ("per_element_random", "random_half", PerElementMerge().merge),
        ("per_element_leading", "leading", PerElementMerge().merge),
        ("per_element_classes", "own_classes", PerElementMerge().merge),
        ("masked_own", "own_masks", MaskedDeltaMerge().merge),
        ("sparse", "sparse", MaskedDeltaMerge().merge),
        *[(f"robust_{name}", kind, _robust(policy, cfg)) for name, kind, policy, cfg in ROBUST_CASES],
    ]
    rows = []
    contributions: list[UpdateContribution] = []
    made_for = ""
    for name, kind, merge in cases:
        if kind != made_for:
            contributions = []
            gc.collect()
            contributions = _contributions(rng, n, kind, leading, layout)
            made_for = kind
        values = [c.values for c in contributions]
        update_bytes = sum(v.nbytes for v in values)
        index_bytes = sum(c.indices.nbytes for c in contributions if c.indices is not None)
        call = lambda m=merge, c=contributions: m(global_flat, c)  # noqa: E731
        loadavg_1m = os.getloadavg()[0]
        merge_s, copy_s = _interleaved(call, values, repeats)
        peak_mb = _peak_extra_mb(call)
        err = _max_err_eps32(name, global_flat, contributions, call())
        merge_mbs, copy_mbs = update_bytes / MB / merge_s, update_bytes / MB / copy_s
        coverage = sum(v.size for v in values) / (n * len(values))
        # maximal runs of consecutive coordinates per value sent: ~0.5 for random sets, small for
        # channel subsets (whose trailing axes are contiguous); 0 for dense rows
        runs = sum(int(np.count_nonzero(np.diff(c.indices) != 1)) + 1 for c in contributions
                   if c.indices is not None and c.indices.size)
        rows.append({
            "case": name, "updates": len(values), "n_params": n, "coverage": round(coverage, 3),
            "runs_per_value": round(runs / sum(v.size for v in values), 4),
            "update_mb": round(update_bytes / MB, 1), "index_mb": round(index_bytes / MB, 1),
            "merge_s_median": round(merge_s, 4), "merge_mb_s": round(merge_mbs, 1),
            "memcpy_s_median": round(copy_s, 5), "memcpy_mb_s": round(copy_mbs, 1),
            "fraction_of_memcpy": round(merge_mbs / copy_mbs, 4),
            "peak_extra_mb": round(peak_mb, 1), "loadavg_1m": round(loadavg_1m, 2), "max_err_eps32": err,
        })
        print(f"  aggregation {name:<20} {len(values)} x {coverage:4.0%} of {n:,} params"
              f" ({update_bytes / MB:6.1f} MB): {merge_s * 1e3:8.1f} ms = {merge_mbs:7.0f} MB/s;"
              f" memcpy {copy_mbs:6.0f} MB/s; ratio {merge_mbs / copy_mbs:.3f}; peak +{peak_mb:.0f} MB;"
              f" load {loadavg_1m:.1f}" + ("" if err is None else f"; error {err:.2f} eps32"), flush=True)
    kernels = scatter_kernels(rng, n, repeats)
    return {"n_params": n, "updates": N_UPDATES, "repeats": repeats, "timer": "process_time", "rows": rows,
            "scatter_kernels": kernels}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
