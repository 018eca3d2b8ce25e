"""Checking an update's payload against its task, and putting it in the form the merge wants.

Pure functions: the engine has already matched the update to an outstanding task and checked
its staleness; here the values themselves are checked (shape, dtype, finiteness, coordinates)
and converted to a delta against the task's base model or to weights, as the merge expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import RoundError
from server import aggregate as agg
from server import weighting
from server.aggregate import FloatArray, IndexArray
from server.events import UpdateReceived
from server.policies import Strategy
from server.records import UPDATE_KINDS, TaskRecord


@dataclass(frozen=True, eq=False)
class Payload:
    indices: IndexArray | None  # coordinates in the global buffer; None = all of it
    values: FloatArray  # a private copy, in the merge's form
    delta_l1: float  # ‖Δ‖_1 against the task's base model (Co-S²P importance)
    rate: float  # the client's model rate (its width), Co-S²P's rate_i
    coord_weights: FloatArray | None = None  # set by a method's `admit` (Chen & Qin's harvest)


def admit_payload(event: UpdateReceived, task: TaskRecord, base: FloatArray, strategy: Strategy,
                  who: str, rate: float) -> Payload:
    """RoundError naming `who` and the value if the payload does not fit `task`."""
    upd = event.update
    if upd.kind not in UPDATE_KINDS:
        raise RoundError(f"{who}: kind {upd.kind!r} is not one of {', '.join(UPDATE_KINDS)}")
    if isinstance(upd.n_samples, bool) or not isinstance(upd.n_samples, (int, np.integer)) or upd.n_samples < 0:
        raise RoundError(f"{who}: n_samples {upd.n_samples!r} is not a count")
    n = base.size
    raw = np.asarray(event.values)
    if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.floating):
        raise RoundError(f"{who}: values must be a 1-D float buffer, got {raw.dtype} {raw.shape}")
    values = np.array(raw, dtype=np.float32)  # a copy: the caller's buffer may be reused
    indices = task.indices if event.indices is None else _sparse_indices(event.indices, task, n, who)
    expected = n if indices is None else int(indices.size)
    if values.size != expected:
        raise RoundError(f"{who}: {values.size} values, profile {task.profile!r} expects {expected}")
    if values.size == 0:
        raise RoundError(f"{who}: empty update")
    if not np.isfinite(values).all():
        raise RoundError(f"{who}: {int((~np.isfinite(values)).sum())} non-finite values")
    base_vals = base if indices is None else base[indices]
    delta = values - base_vals if upd.kind == "weights" else values
    if strategy.merge.form == "weights" and upd.kind == "delta":
        values = base_vals + values  # FedAsync mixes weights; `delta` keeps the sent array
    stored = delta if strategy.merge.form == "delta" else values
    return Payload(indices, stored, weighting.l1_norm(delta), rate)


def _sparse_indices(raw: IndexArray, task: TaskRecord, n: int, who: str) -> IndexArray:
    """Indices a sparse upload (ZeroFL top-k, Co-S²P masks) brings: unique, and inside the task's
    profile. Kept as a private read-only copy, so the merge does not check them again."""
    idx = agg.frozen_indices(raw, n, who)
    if task.indices is not None:
        allowed = np.zeros(n, dtype=bool)
        allowed[task.indices] = True
        outside = int((~allowed[idx]).sum())
        if outside:
            raise RoundError(f"{who}: {outside} indices outside profile {task.profile!r}")
    # A sparse upload of a full-model task is fine under every merge: the coordinates it did not
    # send move by a zero delta (dense, buffered) or are not mixed (FedAsync).
    return idx
