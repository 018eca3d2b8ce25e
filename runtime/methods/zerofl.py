"""`zerofl`, device half and spec: SWAT sparse training and sparse uploads (methods.md §5).

Training (SWAT, weight sparsity only). Every weight tensor (ParamSpec.kind == "weight"; biases
and norm scales stay dense) uses only its top-(1 − s) entries by magnitude in the forward pass;
with `dense_ends` the first and the last weight tensor (first conv, classifier) stay dense. The
update lands on the dense weights kept here, so a weight can re-enter the top set. With plain
SGD (ORT 1.19.2's has no momentum) that needs no custom graph: before a step the backend gets
W⊙m, its gradient is dense in the weights and computed at the sparse forward, and after the step
the dropped W⊙(1−m) is added back, giving W − lr·∇L(W⊙m) for every coordinate, SWAT's update.
The mask is recomputed every `period` steps (1 = every step, as SWAT; its cost is reported as
`topk_ms`, the swap's as `swap_ms`). SWAT's sparse-activation backward needs custom kernels and
is NOT built: the weight gradient is dense, and FLOP savings are estimates (models/methods/zerofl).

Upload (`upload`): `top-k-weights` sends the trained weights at the top-d indices of |w|;
`diff-top-k-weights` sends the delta w − w₀ at those indices; `top-k-diff` sends the delta at
the top-d indices of |w − w₀|; `dense` sends everything (SWAT with a dense upload, a baseline).
The upload density d per weight tensor is (1 − s) + mask_ratio (`density_rule = "extra"`, the
reading of methods.md §5.2) or mask_ratio itself (`density_rule = "total"`). Non-weight tensors
go whole (UpdateBody sends a fully covered tensor dense).

The served model runs the same sparse forward (`swat_forward_weights`): the dense global holds
weights no device used in its forward, and a dense evaluation would score them too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from runtime.backend import MutableFeeds, TrainingBackend
from runtime.errors import ConfigError
from runtime.layout import FloatArray, ParamLayout, ParamSpec
from runtime.methods.base import BackendOpener, DeviceMethod, MethodSpec, UpdateBody
from runtime.protocol import Assignment

UPLOADS = ("top-k-weights", "diff-top-k-weights", "top-k-diff", "dense")
DENSITY_RULES = ("extra", "total")


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"[method] zerofl: {key} must be a finite number, got {value!r}")
    return float(value)


def upload_density(sparsity: float, mask_ratio: float, rule: str) -> float:
    """The fraction of each weight tensor that goes up (ConfigError naming the values if it is not in (0, 1])."""
    density = (1.0 - sparsity) + mask_ratio if rule == "extra" else mask_ratio
    if not 0.0 < density <= 1.0 + 1e-12:
        raise ConfigError(f"[method] zerofl: sparsity {sparsity:g} with mask_ratio {mask_ratio:g} ({rule}) "
                          f"gives upload density {density:g}, outside (0, 1]")
    return min(density, 1.0)


def keep_count(density: float, size: int) -> int:
    return max(1, min(size, math.ceil(density * size - 1e-9)))


def top_indices(values: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.int64]:
    """The (sorted) positions of the k largest |values|."""
    if k >= values.size:
        return np.arange(values.size, dtype=np.int64)
    part = np.argpartition(np.abs(values), values.size - k)[values.size - k:]
    return np.sort(part).astype(np.int64)


class Spec(MethodSpec):
    name = "zerofl"
    param_defaults: ClassVar[Mapping[str, Any]] = {"sparsity": 0.9, "mask_ratio": 0.0, "density_rule": "extra",
                                                   "upload": "top-k-weights", "period": 1, "dense_ends": True}

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        sparsity = _number("sparsity", params["sparsity"])
        if not 0.0 < sparsity < 1.0:
            raise ConfigError(f"[method] zerofl: sparsity {sparsity:g} is outside (0, 1)")
        mask_ratio = _number("mask_ratio", params["mask_ratio"])
        if mask_ratio < 0.0:
            raise ConfigError(f"[method] zerofl: mask_ratio {mask_ratio:g} is negative")
        rule = params["density_rule"]
        if rule not in DENSITY_RULES:
            raise ConfigError(f"[method] zerofl: density_rule {rule!r} is not one of {', '.join(DENSITY_RULES)}")
        if params["upload"] not in UPLOADS:
            raise ConfigError(f"[method] zerofl: upload {params['upload']!r} is not one of {', '.join(UPLOADS)}")
        if params["upload"] != "dense":
            upload_density(sparsity, mask_ratio, rule)
        period = params["period"]
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ConfigError(f"[method] zerofl: period must be an integer >= 1, got {period!r}")
        if not isinstance(params["dense_ends"], bool):
            raise ConfigError(f"[method] zerofl: dense_ends must be true or false, got {params['dense_ends']!r}")
        return {"sparsity": sparsity, "mask_ratio": mask_ratio, "density_rule": rule, "upload": params["upload"],
                "period": period, "dense_ends": params["dense_ends"]}

    def parse_profile(self, text: str, params: Mapping[str, Any] | None) -> str:
        # Every device trains (sparsely) the whole model; the sparsity is the campaign's [method] key.
        if text.strip() != "dense":
            raise ConfigError(f"method 'zerofl' takes only the profile 'dense', got {text!r}")
        return "dense"

    def artifact_profiles(self, profile: str, params: Mapping[str, Any]) -> tuple[str, ...]:
        return (self.parse_profile(profile, params),)

    def extras(self, profile: str, params: Mapping[str, Any]) -> dict[str, Any]:
        return dict(params)


SPEC = Spec()


def masked_tensors(layout: ParamLayout, dense_ends: bool) -> list[int]:
    """Positions in `layout` of the weight tensors SWAT sparsifies in the forward pass."""
    weights = [i for i, p in enumerate(layout.params) if p.kind == "weight"]
    return weights[1:-1] if dense_ends else weights


def dropped_indices(flat: FloatArray, masked: list[ParamSpec], sparsity: float) -> npt.NDArray[np.int64]:
    """Flat indices outside each masked tensor's top-⌈(1 − s)·n⌉ |w|: what SWAT's forward zeroes."""
    parts = []
    for p in masked:
        keep = np.ones(p.size, dtype=bool)
        keep[top_indices(flat[p.offset:p.end], keep_count(1.0 - sparsity, p.size))] = False
        parts.append(p.offset + np.flatnonzero(keep))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def swat_forward_weights(flat: FloatArray, layout: ParamLayout, params: Mapping[str, Any]) -> FloatArray:
    """The weights a ZeroFL model runs its forward with (the served model is scored this way)."""
    out = np.array(flat, dtype=np.float32)
    masked = [layout.params[i] for i in masked_tensors(layout, params["dense_ends"])]
    out[dropped_indices(out, masked, params["sparsity"])] = 0.0
    return out


class Device(DeviceMethod):
    def __init__(self, assignment: Assignment, open_backend: BackendOpener) -> None:
        super().__init__(assignment, open_backend)
        params = SPEC.params({k: v for k, v in assignment.extras.items() if k in SPEC.param_defaults})
        self.sparsity: float = params["sparsity"]
        self.upload: str = params["upload"]
        self.period: int = params["period"]
        self.density_up = 1.0 if self.upload == "dense" else upload_density(
            self.sparsity, params["mask_ratio"], params["density_rule"])
        layout = self.primary.layout
        self.layout = layout
        self.masked = [layout.params[i] for i in masked_tensors(layout, params["dense_ends"])]
        self.upload_tensors = [p for p in layout.params if p.kind == "weight"]
        self._dense: FloatArray = np.zeros(layout.total, dtype=np.float32)
        self._dropped: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)  # flat indices outside the mask
        self.topk_s = self.swap_s = 0.0
        self.recomputes = 0

    def start(self, weights: FloatArray | None, lr: float, rng: np.random.Generator) -> None:
        self._dense = self.primary.get_params() if weights is None else np.array(weights, dtype=np.float32)
        self.primary.set_lr(lr)

    def _recompute(self) -> None:
        t0 = time.perf_counter()
        self._dropped = dropped_indices(self._dense, self.masked, self.sparsity)
        self.recomputes += 1
        self.topk_s += time.perf_counter() - t0

    def before_step(self, step: int, feeds: MutableFeeds) -> TrainingBackend:
        if step % self.period == 0:
            self._recompute()
        t0 = time.perf_counter()
        sparse = self._dense.copy()
        sparse[self._dropped] = 0.0
        self.primary.set_params(sparse)
        self.swap_s += time.perf_counter() - t0
        return self.primary

    def after_step(self, step: int, backend: TrainingBackend, loss: float) -> None:
        t0 = time.perf_counter()
        stepped = backend.get_params()  # W⊙m − lr·g: the dropped entries hold −lr·g
        stepped[self._dropped] += self._dense[self._dropped]
        self._dense = stepped
        self.swap_s += time.perf_counter() - t0

    def trained(self) -> FloatArray:
        return self._dense.copy()

    def report(self) -> dict[str, float]:
        masked = sum(p.size for p in self.masked)
        return {"topk_ms": round(self.topk_s * 1e3, 3), "swap_ms": round(self.swap_s * 1e3, 3),
                "topk_recomputes": float(self.recomputes),
                "forward_density": 1.0 - (self._dropped.size / self.layout.total),
                "masked_params": float(masked)}

    def pack(self, received: FloatArray, trained: FloatArray, form: str) -> UpdateBody:
        if self.upload == "dense":
            return super().pack(received, trained, form)
        delta = trained - received
        chosen = {p.name: top_indices((delta if self.upload == "top-k-diff" else trained)[p.offset:p.end],
                                      keep_count(self.density_up, p.size)) for p in self.upload_tensors}
        parts = [p.offset + chosen[p.name] if p.name in chosen else np.arange(p.offset, p.end, dtype=np.int64)
                 for p in self.layout.params]
        indices = np.concatenate(parts)
        values = trained[indices] if self.upload == "top-k-weights" else delta[indices]
        report = {**self.report(), "upload_fraction": indices.size / self.layout.total}
        return UpdateBody(form="weights" if self.upload == "top-k-weights" else "delta",
                          values=values.astype(np.float32), report=report, indices=indices)
