"""The accumulation kernels under `server/aggregate.py`'s merges: weighted sums of float32 updates
into per-thread pooled buffers (`pooled`), sized by the model, never by the number of updates.

Why float32 products and partial sums: numpy has no fused cast-multiply-add, so a float64
accumulator costs a cast, a multiply and an add per update, each a pass over 8-byte values (~3.5x
a memcpy of the update here). `weighted_sum_into` instead multiplies and adds in float32 (two
passes over 4-byte values that stay in cache) and adds each partial sum of `GROUP` updates into a
float64 buffer (exact: a float32 value always fits a float64). The error against an all-float64
sum is bounded by ~(GROUP + 1) float32 epsilons of `Σ|w_i v_i|` per coordinate, and measured at
< 2 float32 epsilons of it on the benchmark's round (tests/unit/test_accumulate.py states the
tolerance); the merged model is rounded to float32 anyway.

Non-finite values are not looked for here: NaN and ±inf survive every multiply by a finite weight
and every add, so a merge checks its (n_params-sized) result once instead of every update
(`server/aggregate.py`, `_finish`).

Per-element merges (`coverage_sums`) group updates by their index array: a HeteroFL/FjORD tier's
updates share the engine's cached assignment array, so each group is a dense sum over the
group's coordinates followed by ONE scatter-add. Updates whose index arrays are their own (Chen &
Qin per-device submodels, ZeroFL top-k uploads, Co-S²P masks) are scattered by `scatter_add`
into float32 partial sums of GROUP updates, as the dense sums are. The kernel is scipy's compiled
CSC matrix-vector product (`out += A @ [w]` for the one-column matrix of the update), ~0.6 ns per
value here against ~1.0 ns for `np.add.at`, the fastest numpy scatter (`acc[idx] += x` 1.8x,
np.take + np.put 2.7x and `np.bincount` over the concatenated round 2.8x slower than np.add.at;
`scatter_kernels` in bench/README.md). scipy
is no new dependency (scikit-learn, in the host extra, requires it) and ships compiled wheels; the
module is private (`scipy.sparse._sparsetools`), so without it the merge falls back to np.add.at.
Neither kernel checks bounds or repeats: the merges validate every index array first.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # server/aggregate.py imports this module
    from server.aggregate import Float64Array, FloatArray, IndexArray, UpdateContribution

GROUP = 16  # updates per float32 partial sum (speed vs error; see the module docstring)


_POOL = threading.local()  # per thread: role -> the largest buffer asked for so far


def pooled(role: str, size: int, dtype: Any) -> Any:
    """A buffer of `size` elements for `role`, with undefined contents, reused by every merge in
    this thread (it is valid until the next call for the same role). Fresh buffers of a 1M-param
    model cost ~25% of a dense merge in page faults; the pool keeps at most 3 float64 and 4
    float32 values per parameter of the largest model merged (40 MB at 1M) between merges."""
    bufs: dict[str, Any] = _POOL.__dict__.setdefault("bufs", {})
    buf = bufs.get(role)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = bufs[role] = np.empty(size, dtype=dtype)
    return buf[:size]


def release() -> int:
    """Drop this thread's pooled buffers (the next merge allocates them again); returns the bytes freed."""
    bufs: dict[str, Any] = _POOL.__dict__.pop("bufs", {})
    return sum(int(b.nbytes) for b in bufs.values())


def zeroed(role: str, size: int) -> Float64Array:
    buf: Float64Array = pooled(role, size, np.float64)
    buf.fill(0.0)
    return buf


def weighted_sum_into(out: Float64Array, values: Sequence[FloatArray], weights: Sequence[float],
                      coord_weights: Sequence[FloatArray | None] | None = None) -> None:
    """`out += Σ_i weights[i] · coord_weights[i] · values[i]` (coord_weights None = 1), all the same length."""
    size = out.shape[0]
    part: FloatArray = pooled("part", size, np.float32)
    prod: FloatArray = pooled("prod", size, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # the merge reports non-finite results
        _sum_groups(out, values, weights, part, prod, coord_weights)


def _sum_groups(out: Float64Array, values: Sequence[FloatArray], weights: Sequence[float], part: FloatArray,
                prod: FloatArray, coord_weights: Sequence[FloatArray | None] | None) -> None:
    for start in range(0, len(values), GROUP):
        for j in range(start, min(start + GROUP, len(values))):
            target = part if j == start else prod
            np.multiply(values[j], np.float32(weights[j]), out=target)
            cw = None if coord_weights is None else coord_weights[j]
            if cw is not None:
                np.multiply(target, cw, out=target)
            if j != start:
                np.add(part, prod, out=part)
        np.add(out, part, out=out)


@dataclass
class Coverage:
    """Per coordinate: `num` = Σ γ_i v_i over the updates covering it, `den` = Σ γ_i of those
    (None when not asked for: the delta merge needs no per-coordinate normalisation)."""

    num: Float64Array
    den: Float64Array | None


def coverage_sums(n_params: int, contributions: Sequence[UpdateContribution], counts: bool = True) -> Coverage:
    """`Coverage` of a round, in pooled buffers (valid until the next merge in this thread);
    γ_i = weight × coord_weights (when given). Indices must be unique and in range
    (`check_contributions`): the scatter kernel does not check them."""
    groups: dict[int, list[UpdateContribution]] = {}
    for c in contributions:  # same array object = same coordinates; insertion order is deterministic
        groups.setdefault(id(c.indices), []).append(c)
    num = zeroed("num", n_params)
    den = zeroed("den", n_params if counts else 0)
    largest = max((c.size for c in contributions), default=0)
    compact: Float64Array = pooled("compact", largest, np.float64)
    own: list[UpdateContribution] = []  # updates whose index array is theirs alone
    for members in groups.values():
        idx = members[0].indices
        size = members[0].size
        if idx is not None and len(members) == 1:
            own.append(members[0])
            continue
        weights = [c.weight for c in members]
        cws = [c.coord_weights for c in members]
        acc = num if idx is None else compact[:size]
        if idx is not None:
            acc.fill(0.0)
        weighted_sum_into(acc, [c.values for c in members], weights, cws)
        if idx is not None:
            np.add.at(num, idx, acc)
        if counts:
            den_part = _weight_sum(weights, cws, size)
            if idx is None:
                den += den_part
            else:
                np.add.at(den, idx, den_part)
    if own:
        _scatter_own(num, den if counts else None, own, largest)
    return Coverage(num, den if counts else None)


def _scatter_own(num: Float64Array, den: Float64Array | None, own: Sequence[UpdateContribution],
                 largest: int) -> None:
    """Scatter-add updates with index arrays of their own: float32 products scattered into float32
    partial sums of `GROUP` updates (per coordinate at most GROUP terms, as in `weighted_sum_into`,
    so the same error bound), each partial added to the float64 sums. The counts `den` go the same
    way (Σ γ_i, a sum of positive terms, so within (GROUP + 1) float32 epsilons of itself), except
    when they are exact in float32 (`_exact_counts`): then one float32 sum over the whole round,
    added once, saves an n-sized float64 add per GROUP updates."""
    n = num.shape[0]
    part: FloatArray = pooled("part", n, np.float32)
    den_part: FloatArray = pooled("prod", n if den is not None else 0, np.float32)
    ones: FloatArray = pooled("ones", largest if den is not None else 0, np.float32)
    ones.fill(1.0)
    exact = den is not None and _exact_counts(own)
    den_part.fill(0.0)
    with np.errstate(over="ignore", invalid="ignore"):  # the merge reports non-finite results
        for start in range(0, len(own), GROUP):
            part.fill(0.0)
            if start and not exact:
                den_part.fill(0.0)
            group = [c for c in own[start:start + GROUP] if c.size]
            # All the group's sums, then all its counts: one float32 target at a time (a Chen &
            # Qin round scattered ~20 % faster so than alternating the two per update).
            for c in group:
                assert c.indices is not None
                data = np.ascontiguousarray(c.values)
                if c.coord_weights is not None:
                    cw = np.ascontiguousarray(c.coord_weights, dtype=np.float32)
                    data = np.multiply(data, cw, out=pooled("scaled", largest, np.float32)[:c.size])
                scatter_add(part, c.indices, data, np.float32(c.weight))
            for c in group if den is not None else ():
                assert c.indices is not None
                cw = ones[:c.size] if c.coord_weights is None else np.ascontiguousarray(c.coord_weights, np.float32)
                scatter_add(den_part, c.indices, cw, np.float32(c.weight))
            np.add(num, part, out=num)
            if den is not None and not exact:
                np.add(den, den_part, out=den)
    if den is not None and exact:
        np.add(den, den_part, out=den)


def _exact_counts(own: Sequence[UpdateContribution]) -> bool:
    """Whether float32 sums of the round's weights are exact at every coordinate: no coordinate
    weights, whole-number weights (sample counts, CountWeight's 1) summing below 2**24, where every
    partial sum of whole numbers is a float32."""
    total = 0.0
    for c in own:
        if c.coord_weights is not None or not float(c.weight).is_integer():
            return False
        total += c.weight
    return total < 2**24


def _scatter_add_numpy(out: FloatArray, idx: IndexArray, data: FloatArray, weight: np.float32) -> None:
    np.add.at(out, idx, data * weight)


def _scatter_add_csc(out: FloatArray, idx: IndexArray, data: FloatArray, weight: np.float32) -> None:
    # `out += A @ [weight]` for the one-column CSC matrix A = (data at rows idx): scipy's compiled
    # loop `out[idx[k]] += data[k] * weight`, with no copy when every array is contiguous and of
    # the kernel's types (int32 or int64 rows, float32 values), as they are here. int32 rows, what
    # `check_indices` gives a model of up to 2**31 parameters, scatter ~20 % faster than int64.
    rows = idx if idx.dtype in _KERNEL_INDEX and idx.flags.c_contiguous else np.ascontiguousarray(idx, np.int64)
    _csc_matvec(out.shape[0], 1, np.array([0, rows.shape[0]], dtype=rows.dtype), rows, data,
                np.array([weight], dtype=np.float32), out)


_KERNEL_INDEX = (np.dtype(np.int32), np.dtype(np.int64))


try:  # scipy comes with scikit-learn (the host extra); its C++ sparse kernels need no compiler
    from scipy.sparse._sparsetools import csc_matvec as _csc_matvec
except ImportError:  # pragma: no cover - a server without scipy merges with np.add.at (~2x slower)
    scatter_add = _scatter_add_numpy
else:
    scatter_add = _scatter_add_csc


def _weight_sum(weights: Sequence[float], cws: Sequence[FloatArray | None], size: int) -> float | Float64Array:
    """Σ γ_i of a group: a scalar without coordinate weights, else a per-coordinate float64 vector."""
    scalar = sum(w for w, cw in zip(weights, cws, strict=True) if cw is None)
    if all(cw is None for cw in cws):
        return scalar
    vec = np.full(size, scalar, dtype=np.float64)
    for w, cw in zip(weights, cws, strict=True):
        if cw is not None:
            vec += w * cw.astype(np.float64)
    return vec
