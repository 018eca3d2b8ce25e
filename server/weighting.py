"""Update weights: staleness functions, L1 norms and drifts, and Co-S²P's importance over
staleness (methods.md §1.3, §6.5, §6.6). Pure numpy functions over float64 weight vectors; the
weight policies of `server/policies.py` call them and the merges of `server/aggregate.py` take
their results as `UpdateContribution.weight`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from runtime.errors import RoundError

if TYPE_CHECKING:  # server/aggregate.py imports this module
    from server.aggregate import Float64Array, FloatArray
def normalise_l1(weights: npt.NDArray[np.float64]) -> Float64Array:
    """`w / Σ|w|`; all-zero weights become equal weights (their updates are then all zero in
    Co-S²P, so any split is the same, but 0/0 must not reach the model)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0:
        return w
    if not np.isfinite(w).all():
        raise RoundError(f"cannot normalise non-finite weights {w.tolist()}")
    total = float(np.abs(w).sum())
    if total == 0.0:
        return np.full(w.shape, 1.0 / w.size)
    result: Float64Array = w / total
    return result


def staleness_polynomial(staleness: int, a: float) -> float:
    """FedAsync polynomial `(1 + s)^-a`."""
    return float((1.0 + _check_staleness(staleness)) ** (-a))


def staleness_sqrt(staleness: int) -> float:
    """FedBuff `1 / sqrt(1 + s)`."""
    return 1.0 / math.sqrt(1.0 + _check_staleness(staleness))


def staleness_hinge(staleness: int, a: float, b: float) -> float:
    """FedAsync hinge: 1 while `s <= b`, then `1 / (a (s − b) + 1)`."""
    s = _check_staleness(staleness)
    return 1.0 if s <= b else 1.0 / (a * (s - b) + 1.0)


def staleness_constant(staleness: int) -> float:
    _check_staleness(staleness)
    return 1.0


def _check_staleness(staleness: int) -> int:
    if staleness < 0:
        raise RoundError(f"staleness {staleness} is negative (update from a future version?)")
    return staleness


def l1_norm(values: npt.NDArray[np.float32]) -> float:
    return float(np.abs(np.asarray(values, dtype=np.float64)).sum())


def l1_drift(current: FloatArray, base: FloatArray) -> float:
    """`Σ_k ‖W^(t)[k] − W^(τ)[k]‖_1` over all tensors k = the L1 norm of the flat difference."""
    if current.shape != base.shape:
        raise RoundError(f"model versions differ in shape: {current.shape} vs {base.shape}")
    return float(np.abs(current.astype(np.float64) - base.astype(np.float64)).sum())


IMPORTANCE_CAP = 3.0  # × the round's lower-median importance


def clip_importance(importance: Float64Array, rates: Float64Array,
                    cap: float | None = IMPORTANCE_CAP) -> Float64Array:
    """Importances `‖Δ_i‖_1 / rate_i` above `cap` × the round's lower median, per unit of rate, are
    set to that ceiling: `min(imp_i, cap · lowmed_j(imp_j / rate_j) · rate_i)`.

    Co-S²P weighs an update by its own delta's norm, so without a ceiling a client buys weight by
    scaling its delta (a 100× delta took ~97 % of a round's weight). Per unit of rate, because an
    honest width-r client sends ~r² of the coordinates, so its importance is ~r times a full one's:
    a dense client among narrow ones is not clipped for being dense. The lower median of two is the
    smaller one, so even a round of two cannot be bought. `cap=None` is the paper's unclipped rule."""
    imp = np.asarray(importance, dtype=np.float64)
    r = np.asarray(rates, dtype=np.float64)
    if cap is None or imp.size == 0:
        return imp
    per_rate = imp / r
    k = (imp.size - 1) // 2
    ceiling = cap * float(np.partition(per_rate, k)[k]) * r
    result: Float64Array = np.where(ceiling > 0, np.minimum(imp, ceiling), imp)
    return result


def cos2p_weights(
    delta_l1: Sequence[float], rates: Sequence[float], drift_l1: Sequence[float],
    importance_cap: float | None = IMPORTANCE_CAP,
) -> Float64Array:
    """Co-S²P importance over staleness, L1-normalised over the round (methods.md §1.3):

    `γ̃_i = (‖Δ_i‖_1 / rate_i) / (‖W^(t) − W^(τ_i)‖_1 + 1)`, `γ_i = γ̃_i / Σ_j γ̃_j`, with the
    importance `‖Δ_i‖_1 / rate_i` first clipped at `importance_cap` × its round median
    (`clip_importance`; not in the paper, which trusts its clients).
    """
    d = np.asarray(delta_l1, dtype=np.float64)
    r = np.asarray(rates, dtype=np.float64)
    s = np.asarray(drift_l1, dtype=np.float64)
    if not d.shape == r.shape == s.shape:
        raise RoundError(f"Co-S²P weights: {d.size} deltas, {r.size} rates, {s.size} drifts")
    if np.any(r <= 0) or np.any(s < 0) or np.any(d < 0):
        raise RoundError(f"Co-S²P weights need rates > 0 and norms >= 0, got rates {r.tolist()}")
    return normalise_l1(clip_importance(d / r, r, importance_cap) / (s + 1.0))
