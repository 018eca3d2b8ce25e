"""Aggregation math: pure numpy functions over flat float32 parameter buffers.

Every update is an `UpdateContribution`: values at flat `indices` of the global buffer (None =
the whole buffer), plus a scalar weight. Submodels (HeteroFL, FedRolex, FjORD, Chen & Qin,
Co-S²P masks, ZeroFL top-k) all reduce to an index array (`runtime.submodel`), so the same
functions serve every method.

Rules every merge follows:
- inputs are validated (finite values and weights, matching lengths, indices in range and unique),
  and a `RoundError` names the offending contribution. Shapes, weights and indices are checked
  first; an index array is checked once per merge however many updates share it, and once for
  good when it is frozen (read-only, as the engine's assignment cache makes it). Finiteness of the
  values is checked on the result: NaN/inf survive the weighted sum, so one pass over the merged
  buffer finds them, and only then are the updates searched for the one to name;
- the result is a NEW float32 array; the global buffer passed in is never written to, so a failed
  merge leaves the old global model intact;
- sums are float32 products and partial sums of 16 updates, accumulated in float64 and rounded
  to float32 once (`server/accumulate.py` gives the speed and the error bound).

Formulas are those of research/methods.md §1.3 (Co-S²P), §6.1 (FedAvg), §6.3 (HeteroFL), §6.5
(FedAsync) and §6.6 (FedBuff).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from runtime.errors import RoundError
from runtime.frame_table import index_dtype
from server.accumulate import coverage_sums, weighted_sum_into, zeroed
from server.weighting import normalise_l1

FloatArray = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]
# int32 when the model has at most 2**31 parameters (`check_indices` narrows), else int64
IndexArray = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class UpdateContribution:
    """One update as the merge functions see it.

    `values` are weights or a delta (the function decides which it expects) at `indices` of the
    global buffer; `indices=None` means the values cover the whole buffer in order.
    """

    indices: IndexArray | None
    values: FloatArray
    weight: float
    # A weight per value on top of `weight` (Chen & Qin's per-task harvest); per-element merges only.
    coord_weights: FloatArray | None = None

    @property
    def size(self) -> int:
        return int(self.values.shape[0])


# ---------------------------------------------------------------- validation
def check_global(global_flat: npt.NDArray[np.float32], what: str = "global model") -> FloatArray:
    arr = np.asarray(global_flat)
    if arr.dtype != np.float32 or arr.ndim != 1:
        raise RoundError(f"{what} must be a 1-D float32 buffer, got {arr.dtype} of shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise RoundError(f"{what} holds {int((~np.isfinite(arr)).sum())} non-finite values")
    return arr


# id -> (the array, n_params) of frozen index arrays already checked; an entry leaves with its array.
_CHECKED: dict[int, tuple[weakref.ref[IndexArray], int]] = {}


def _frozen(arr: npt.NDArray[np.int64]) -> bool:
    """Nothing can write to `arr`: it and every array it is a view of are read-only."""
    a: object = arr
    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return False
        a = a.base
    return True


def check_indices(indices: npt.NDArray[np.int64], n_params: int, what: str) -> IndexArray:
    """`indices` as a 1-D array of unique coordinates in [0, n_params), or raise, in the
    narrowest index type for the model (`runtime.frame_table.index_dtype`: int32 up to 2**31
    parameters, whose scatters run ~20 % faster than int64's; a copy when `indices` is of another
    integer type). A frozen array that passed before (for this `n_params`) is returned at once,
    as it is (a frozen int64 array is then not narrowed: the merges scatter either type)."""
    hit = _CHECKED.get(id(indices))
    if hit is not None and hit[0]() is indices and hit[1] == n_params:
        return indices
    idx = _check_indices(indices, n_params, what)
    if isinstance(indices, np.ndarray) and _frozen(indices):
        _remember(indices, n_params)
    return idx


def frozen_indices(indices: npt.NDArray[np.int64], n_params: int, what: str) -> IndexArray:
    """`check_indices`, as a private read-only array in the model's index type (never the
    caller's, which may be reused), remembered as checked so that no merge checks it again.
    Range and repeats are checked before it is narrowed, so no index wraps into range."""
    arr = np.asarray(indices)
    idx = _check_indices(arr, n_params, what)
    if np.may_share_memory(idx, arr):
        idx = idx.copy()
    idx.flags.writeable = False
    _remember(idx, n_params)
    return idx


def _remember(idx: npt.NDArray[np.int64], n_params: int) -> None:
    key = id(idx)

    def forget(_ref: object, key: int = key) -> None:
        _CHECKED.pop(key, None)

    _CHECKED[key] = (weakref.ref(idx, forget), n_params)


def _check_indices(indices: npt.NDArray[np.int64], n_params: int, what: str) -> IndexArray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise RoundError(f"{what}: indices must be a 1-D integer array, got {idx.dtype} of shape {idx.shape}")
    want = np.dtype(index_dtype(n_params))
    if idx.dtype != want and not (idx.dtype.kind == "i" and idx.dtype.itemsize <= want.itemsize):
        idx = idx.astype(np.int64, copy=False)  # range-checked below before it is narrowed: no wrap-around
    if idx.size == 0:
        return idx.astype(want, copy=False)
    # Submodels and top-k uploads come sorted: strictly increasing means unique, with the range at
    # the ends, in one pass over the indices instead of the n_params scratch below.
    increasing = idx.size == 1 or bool((idx[1:] > idx[:-1]).all())
    lo, hi = (int(idx[0]), int(idx[-1])) if increasing else (int(idx.min()), int(idx.max()))
    if lo < 0 or hi >= n_params:
        raise RoundError(f"{what}: indices span [{lo}, {hi}], outside the model's [0, {n_params})")
    idx = idx.astype(want, copy=False)
    if increasing:
        return idx
    # Each update must cover a coordinate once (per-element counts, robust blocks); a boolean
    # scratch buffer checks that in O(n) without sorting.
    seen = np.zeros(n_params, dtype=bool)
    seen[idx] = True
    n_unique = int(np.count_nonzero(seen))
    if n_unique != idx.size:
        raise RoundError(f"{what}: {idx.size - n_unique} repeated indices")
    return idx


def check_contributions(n_params: int, contributions: Sequence[UpdateContribution], *,
                        finite: bool = True) -> None:
    """Raise `RoundError` naming the first contribution that does not fit a model of `n_params`.
    `finite=False` leaves the values' finiteness to the caller's check of its result (`_finish`)."""
    checked: set[int] = set()  # index arrays already checked in this call
    for i, c in enumerate(contributions):
        what = f"contribution {i}"
        values = np.asarray(c.values)
        if values.dtype != np.float32 or values.ndim != 1:
            raise RoundError(f"{what}: values must be 1-D float32, got {values.dtype}, shape {values.shape}")
        expected = n_params if c.indices is None else int(np.asarray(c.indices).shape[0])
        if c.indices is not None and id(c.indices) not in checked:
            check_indices(c.indices, n_params, what)
            checked.add(id(c.indices))
        if values.shape[0] != expected:
            raise RoundError(f"{what}: {values.shape[0]} values, expected {expected}")
        if finite:
            _check_finite(what, values)
        if not math.isfinite(c.weight) or c.weight < 0:
            raise RoundError(f"{what}: weight {c.weight} must be finite and >= 0")
        if c.coord_weights is not None:
            cw = np.asarray(c.coord_weights)
            if cw.shape != values.shape:
                raise RoundError(f"{what}: {cw.size} coordinate weights for {values.size} values")
            # Two reductions with no temporaries (NaN propagates through min): finite and >= 0.
            if cw.size and not (float(cw.min()) >= 0.0 and float(cw.max()) < math.inf):
                raise RoundError(f"{what}: coordinate weights must be finite and >= 0")


def _check_finite(what: str, values: FloatArray) -> None:
    if not np.isfinite(values).all():
        raise RoundError(f"{what}: {int((~np.isfinite(values)).sum())} non-finite values")


def _no_coord_weights(contributions: Sequence[UpdateContribution], what: str) -> None:
    if any(c.coord_weights is not None for c in contributions):
        raise RoundError(f"{what} takes no per-coordinate weights; only the per-element merges do")


def _finish(out: Float64Array, what: str, contributions: Sequence[UpdateContribution] = (),
            plus: FloatArray | None = None) -> FloatArray:
    """`out` (+ `plus`, added in float64) rounded to a new float32 array, refused if not finite.
    The add and the rounding are one pass, the same bits as adding in place and then rounding."""
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite values are reported below
        result = out.astype(np.float32) if plus is None else np.add(out, plus, out=np.empty(out.shape, np.float32))
    if not np.isfinite(result).all():
        _name_nonfinite(contributions)
        # Finite inputs, but the sum overflowed float32; refuse rather than publish inf.
        raise RoundError(f"{what} produced {int((~np.isfinite(result)).sum())} non-finite values")
    return result


def _name_nonfinite(contributions: Sequence[UpdateContribution]) -> None:
    """Raise naming the first contribution with a non-finite value, if there is one."""
    for i, c in enumerate(contributions):
        _check_finite(f"contribution {i}", c.values)


# ---------------------------------------------------------------- merges
def weighted_average(global_flat: FloatArray, contributions: Sequence[UpdateContribution]) -> FloatArray:
    """FedAvg: `Σ n_i w_i / Σ n_i` over dense weight vectors (weights = n_i)."""
    g = check_global(global_flat)
    check_contributions(g.size, contributions, finite=False)
    if not contributions:
        raise RoundError("weighted average of zero contributions")
    if any(c.indices is not None for c in contributions):
        raise RoundError("weighted_average takes full-model updates; per_element_average takes submodels")
    _no_coord_weights(contributions, "weighted average")
    total = sum(c.weight for c in contributions)
    if total <= 0:
        raise RoundError(f"weighted average: weights sum to {total}, need > 0")
    acc = zeroed("num", g.size)
    weighted_sum_into(acc, [c.values for c in contributions], [c.weight / total for c in contributions])
    return _finish(acc, "weighted average", contributions)


def _coverage(n_params: int, contributions: Sequence[UpdateContribution],
              what: str) -> tuple[Float64Array, Float64Array]:
    cov = coverage_sums(n_params, contributions)
    if not np.isfinite(cov.num).all():  # also where den is 0: a weight-0 update's NaN is still bad
        _name_nonfinite(contributions)
        raise RoundError(f"{what}: weighted sums overflowed")
    assert cov.den is not None  # counts=True
    return cov.num, cov.den


def per_element_average(global_flat: FloatArray, contributions: Sequence[UpdateContribution]) -> FloatArray:
    """HeteroFL/FjORD/FedRolex/Chen & Qin merge of submodel WEIGHTS.

    `W[j] = Σ_{i∋j} γ_i w_i[j] / Σ_{i∋j} γ_i`; coordinates nobody covers (or covers with weight 0)
    keep the global value. With unit weights this is HeteroFL's count average (methods.md §6.3).
    """
    g = check_global(global_flat)
    check_contributions(g.size, contributions, finite=False)
    num, den = _coverage(g.size, contributions, "per-element average")
    covered = den > 0
    np.divide(num, den, out=num, where=covered)
    np.copyto(num, g, where=~covered)
    return _finish(num, "per-element average", contributions)


def per_element_delta(
    global_flat: FloatArray, contributions: Sequence[UpdateContribution], server_lr: float = 1.0
) -> FloatArray:
    """Per-element merge of DELTAS: `W[j] + η Σ_{i∋j} γ_i Δ_i[j] / Σ_{i∋j} γ_i`.

    Equals `per_element_average` when every delta is taken against the current global model; it
    is the form that stays meaningful when updates start from different (stale) base versions.
    """
    g = check_global(global_flat)
    check_contributions(g.size, contributions, finite=False)
    _check_lr(server_lr)
    num, den = _coverage(g.size, contributions, "per-element delta merge")
    # Where den is 0 every covering weight is 0, so num is an exact 0 there and W stays W.
    np.divide(num, den, out=num, where=den > 0)
    if server_lr != 1.0:
        num *= server_lr
    return _finish(num, "per-element delta merge", contributions, plus=g)


def apply_deltas(
    global_flat: FloatArray, contributions: Sequence[UpdateContribution], server_lr: float = 1.0
) -> FloatArray:
    """`W + η Σ γ_i Δ_i`, each Δ_i scattered at its indices (dense when indices is None).

    No per-coordinate normalisation: this is Co-S²P's masked-delta merge (a coordinate held by
    few clients takes a smaller step, methods.md §1.3) and ZeroFL's "diff" merge. The caller
    picks γ_i (normalised or not).
    """
    g = check_global(global_flat)
    check_contributions(g.size, contributions, finite=False)
    _no_coord_weights(contributions, "the delta merge")
    _check_lr(server_lr)
    acc = coverage_sums(g.size, contributions, counts=False).num
    if server_lr != 1.0:
        acc *= server_lr
    return _finish(acc, "delta merge", contributions, plus=g)


def masked_delta_merge(
    global_flat: FloatArray, contributions: Sequence[UpdateContribution], server_lr: float = 1.0
) -> FloatArray:
    """Co-S²P server step: γ L1-normalised over this round, then `W + η Σ γ_i Δ_i` (no per-element norm)."""
    gammas = normalise_l1(np.array([c.weight for c in contributions], dtype=np.float64))
    scaled = [
        UpdateContribution(c.indices, c.values, float(w), c.coord_weights)
        for c, w in zip(contributions, gammas, strict=True)
    ]
    return apply_deltas(global_flat, scaled, server_lr)


def fedbuff_apply(
    global_flat: FloatArray, contributions: Sequence[UpdateContribution], server_lr: float = 1.0
) -> FloatArray:
    """FedBuff flush: `W + η_g · (Σ_i s(τ_i) Δ_i) / K` with K = the number of buffered updates.

    Weights are the staleness factors s(τ_i); they are NOT renormalised (methods.md §6.6).
    """
    if not contributions:
        raise RoundError("FedBuff flush of an empty buffer")
    k = len(contributions)
    return apply_deltas(global_flat, contributions, server_lr / k)


def fedasync_mix(global_flat: FloatArray, contribution: UpdateContribution) -> FloatArray:
    """FedAsync: `W = (1 − α_t) W + α_t w_new` with α_t = `contribution.weight` in [0, 1].

    `contribution.values` are the client's WEIGHTS; for a submodel only its coordinates mix.
    """
    g = check_global(global_flat)
    check_contributions(g.size, [contribution])
    _no_coord_weights([contribution], "FedAsync mixing")
    alpha = contribution.weight
    if alpha > 1.0:
        raise RoundError(f"FedAsync mixing weight {alpha} is above 1")
    out = g.astype(np.float64)
    new = contribution.values.astype(np.float64)
    if contribution.indices is None:
        out = (1.0 - alpha) * out + alpha * new
    else:
        idx = contribution.indices
        out[idx] = (1.0 - alpha) * out[idx] + alpha * new
    return _finish(out, "FedAsync mix")


def _check_lr(server_lr: float) -> None:
    if not math.isfinite(server_lr) or server_lr < 0:
        raise RoundError(f"server learning rate {server_lr} must be finite and >= 0")
