"""`cos2p`, device half and spec: Co-S²P (methods.md §1.2) on the multi-exit cnn / resnet.

A device of tier (keep ρ, depth ρ_d) holds the first ⌊ρ_d·B⌋ block groups of the model and the
exit heads up to there (B = models/structure EXIT_BLOCKS). The task's weights are that depth-d
prefix of the global model at full width (the primary artifact, `exits-γ-T` graph).

Mask learning, in rounds `round_index < mask_rounds`: the first `mask_fraction` of the round's
steps train the per-unit scores of the mask-learning artifact (`mask-λ1` graph: weights frozen
and fed by name, scores trainable). Each step the host draws m ~ Bernoulli(σ(s)) and feeds it
with the scores' current value (the straight-through term, models/builder.py `unit_mask`). The
scores start at logit(ρ) and carry over between mask rounds. Then one binary mask per unit is
sampled (`sample_mask`), stored in the device's state folder, and the rest of the round, and
every later round, trains the physically sliced submodel (the `exits-γ-T` artifact of the sliced
structure) with CE at every exit plus, from `kd_from_round`, the cross-block KD term.

DEVIATION (documented, deliberate): the sampled mask keeps exactly ⌈ρ·C⌉ units per group (the
units the Bernoulli draw kept, the highest-scored first; topped up with the highest-scored of
the rest when the draw kept fewer). ONNX Runtime trains one fixed graph per structure and the
artifacts are generated on the host before the campaign, so a per-device random unit count
would need an artifact built per device at run time. With fixed counts a tier's submodel has
the structure (size, memory, step time) of HeteroFL/FedRolex at the same keep rate; only WHICH
units are kept is data-aware. The authors' resample of an empty layer is kept (it decides the
draw). `mask = "random"` (the ablation) keeps ⌈ρ·C⌉ uniformly random units instead and spends
no steps on scores.

Upload: the masked delta, as indices (into the primary layout, which is the global model's
prefix) plus values, with the model rate ρ (`report.model_rate`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from runtime.backend import KD_GATE, KEEP_TARGET, MutableFeeds, TrainingBackend
from runtime.errors import ArtifactError, ConfigError, LayoutError
from runtime.layout import FloatArray, ParamLayout
from runtime.methods.base import BackendOpener, DeviceMethod, MethodSpec, UpdateBody
from runtime.profile import Profile, with_variant
from runtime.protocol import Assignment
from runtime.submodel import IndexArray, Submodel, kept_channels

MASKS = ("learned", "random")
SCORE_PREFIX, SAMPLE_PREFIX, REF_PREFIX = "mask.", "mask_sample.", "score_ref."  # models/builder.py
STATE_PREFIX = "cos2p-mask"  # + the tier and the layout: a device moved to another tier keeps both masks
EMPTY_RESAMPLES = 100  # the authors loop until a layer is non-empty; bounded here, then top-1


def _rate(what: str, text: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"cos2p profile {text!r}: {what} {value!r} is not a number") from None
    if not 0.0 < v <= 1.0 or not math.isfinite(v):
        raise ConfigError(f"cos2p profile {text!r}: {what} rate {v:g} is outside (0, 1]")
    return v


def parse_tier(text: str) -> tuple[float, float]:
    """(keep, depth) of `dense` or `keep=ρ,depth=ρ_d` (either may be left out: 1)."""
    text = text.strip()
    keep = depth = 1.0
    if text != "dense":
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in ("keep", "depth"):
                raise ConfigError(f"method 'cos2p' takes profiles 'keep=<rate>,depth=<rate>' or 'dense', got {text!r}")
            if key.strip() == "keep":
                keep = _rate("keep", text, value.strip())
            else:
                depth = _rate("depth", text, value.strip())
    return keep, depth


def tier_text(keep: float, depth: float) -> str:
    return "dense" if keep == 1.0 and depth == 1.0 else f"keep={keep:g},depth={depth:g}"


def _number(key: str, value: Any, lo: float, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ConfigError(f"[method] cos2p: {key} must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


class Spec(MethodSpec):
    name = "cos2p"
    param_defaults: ClassVar[Mapping[str, Any]] = {
        "mask_rounds": 2, "mask_fraction": 0.5, "mask_lr": 0.2, "lambda1": 1.0, "mask": "learned",
        "kd_gamma": 0.5, "kd_temperature": 3.0, "kd_from_round": 10}
    strategy_defaults: ClassVar[Mapping[str, Any]] = {"weight": "cos2p", "merge": "masked-delta"}

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        for key in ("mask_rounds", "kd_from_round"):
            v = params[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"[method] cos2p: {key} must be an integer >= 0, got {v!r}")
        if params["mask"] not in MASKS:
            raise ConfigError(f"[method] cos2p: mask {params['mask']!r} is not one of {', '.join(MASKS)}")
        out = dict(params)
        out["mask_fraction"] = _number("mask_fraction", params["mask_fraction"], 0.0, 1.0)
        out["mask_lr"] = _number("mask_lr", params["mask_lr"], 1e-12)
        out["lambda1"] = _number("lambda1", params["lambda1"], 0.0)
        out["kd_gamma"] = _number("kd_gamma", params["kd_gamma"], 0.0)
        out["kd_temperature"] = _number("kd_temperature", params["kd_temperature"], 1e-12)
        return out

    def parse_profile(self, text: str, params: Mapping[str, Any] | None) -> str:
        return tier_text(*parse_tier(text))

    def artifact_profiles(self, profile: str, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The primary (depth-d, full width, exits graph), the mask-learning graph, the sliced
        submodel (⌈ρ·C⌉ channels per group), in runtime.profile grammar with graph variants."""
        keep, depth = parse_tier(profile)
        exits = f"exits-{params['kd_gamma']:g}-{params['kd_temperature']:g}"
        return (with_variant(Profile(depth=depth).canonical(), exits),
                with_variant(Profile(depth=depth).canonical(), f"mask-{params['lambda1']:g}"),
                with_variant(Profile(width=keep, depth=depth).canonical(), exits))

    def auxiliary_artifacts(self, profile: str, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The mask graph (scores, no slice of the global) and the sliced submodel, whose
        channels are each device's own mask: the server sends them but scores neither."""
        primary, *rest = self.artifact_profiles(profile, params)
        return tuple(a for a in rest if a != primary)  # keep 1: the slice is the primary itself

    def global_profile(self, params: Mapping[str, Any]) -> str:
        return with_variant("dense", f"exits-{params['kd_gamma']:g}-{params['kd_temperature']:g}")

    def extras(self, profile: str, params: Mapping[str, Any]) -> dict[str, Any]:
        keep, depth = parse_tier(profile)
        return {"keep": keep, "depth": depth, "mask_rounds": params["mask_rounds"],
                "mask_fraction": params["mask_fraction"], "mask_lr": params["mask_lr"], "mask": params["mask"],
                "kd_from_round": params["kd_from_round"]}


SPEC = Spec()


def state_file(keep: float, layout: ParamLayout) -> str:
    return f"{STATE_PREFIX}-keep{keep:g}-{layout.fingerprint()}.json"


def _sigmoid(s: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-np.asarray(s, dtype=np.float64)))


def sample_mask(scores: npt.NDArray[np.float32], keep: float, rng: np.random.Generator) -> IndexArray:
    """The kept units of one group: a Bernoulli(σ(s)) draw, redrawn while empty (as the authors
    do), then cut or topped up to ⌈keep·C⌉ by score (see the module's DEVIATION)."""
    p = _sigmoid(scores)
    k = kept_channels(keep, p.size)
    draw = rng.random(p.size) < p
    for _ in range(EMPTY_RESAMPLES):
        if draw.any():
            break
        draw = rng.random(p.size) < p
    order = np.lexsort((-p, ~draw))  # drawn units first, each part by falling score
    return np.sort(order[:k]).astype(np.int64)


def random_mask(size: int, keep: float, rng: np.random.Generator) -> IndexArray:
    return np.sort(rng.choice(size, kept_channels(keep, size), replace=False)).astype(np.int64)


def jaccard(a: Mapping[str, IndexArray], b: Mapping[str, IndexArray]) -> float:
    """|A ∩ B| / |A ∪ B| over every (group, unit) pair."""
    inter = sum(np.intersect1d(a[g], b[g]).size for g in a)
    union = sum(np.union1d(a[g], b[g]).size for g in a)
    return inter / union if union else 1.0


class Device(DeviceMethod):
    def __init__(self, assignment: Assignment, open_backend: BackendOpener) -> None:
        super().__init__(assignment, open_backend)
        if len(assignment.artifact_keys) != 3:
            raise ConfigError(f"cos2p assignment has {len(assignment.artifact_keys)} artifacts, needs 3")
        x = assignment.extras
        self.keep = float(x["keep"])
        self.round_index = int(x.get("round_index", 0))
        self.mask_kind = str(x.get("mask", "learned"))
        self.learning = self.mask_kind == "learned" and self.round_index < int(x.get("mask_rounds", 2))
        self.mask_fraction = float(x.get("mask_fraction", 0.5))
        self.mask_lr = float(x.get("mask_lr", 0.5))
        self.kd_on = self.round_index >= int(x.get("kd_from_round", 10))
        self.mask_backend = open_backend(assignment.artifact_keys[1])
        self.sliced = open_backend(assignment.artifact_keys[2])
        self.layout = self.primary.layout
        self.groups = [p.axes[0].group for p in self.mask_backend.layout if p.axes[0] is not None]
        for g in self.groups:
            if g not in self.layout.groups:
                raise ArtifactError(f"cos2p mask artifact scores group {g!r}, which the primary artifact lacks")
        self._full: FloatArray = np.zeros(self.layout.total, dtype=np.float32)
        self._rng = np.random.default_rng(0)
        self.mask: dict[str, IndexArray] | None = None
        self.scores: FloatArray | None = None
        self.sub: Submodel | None = None
        self.mask_steps = self.kept_sum = 0.0
        self._loaded = False

    # ------------------------------------------------------------ state
    def _state_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / state_file(self.keep, self.layout)

    def load_state(self) -> None:
        path = self._state_path()
        if path is None or not path.is_file():
            return
        data = json.loads(path.read_text())
        if data.get("layout") != self.layout.fingerprint() or data.get("keep") != self.keep:
            raise LayoutError(f"cos2p mask file {path} was learned for layout {data.get('layout')!r} at keep "
                              f"{data.get('keep')!r}, not this model's {self.layout.fingerprint()!r} at {self.keep:g}")
        # A random mask (the ablation) has no scores.
        self.scores = None if data.get("scores") is None else np.asarray(data["scores"], dtype=np.float32)
        if self.scores is not None and self.scores.size != self.mask_backend.layout.total:
            raise LayoutError(f"cos2p mask file {path} holds {self.scores.size} scores, the mask graph has "
                              f"{self.mask_backend.layout.total}")
        if data.get("mask") is not None:
            self.mask = {g: np.asarray(v, dtype=np.int64) for g, v in data["mask"].items()}
            self.set_mask(self.mask)

    def save_state(self) -> None:
        path = self._state_path()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"layout": self.layout.fingerprint(), "keep": self.keep,
                "scores": None if self.scores is None else [float(v) for v in self.scores],
                "mask": None if self.mask is None else {g: v.tolist() for g, v in self.mask.items()}}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)  # atomic: a crash leaves the old mask, never half of one

    def set_mask(self, mask: Mapping[str, IndexArray]) -> None:
        """Freeze `mask` (group -> kept units); LayoutError naming the group if it does not fit."""
        for g in self.groups:
            if g not in mask:
                raise LayoutError(f"cos2p mask lacks group {g!r}")
            want = kept_channels(self.keep, self.layout.groups[g])
            if mask[g].size != want:
                raise LayoutError(f"cos2p mask of group {g!r} keeps {mask[g].size} units, keep {self.keep:g} "
                                  f"needs {want}")
        self.mask = {g: np.asarray(mask[g], dtype=np.int64) for g in self.groups}
        self.sub = Submodel.of(self.layout, self.mask)
        if self.sub.sub_layout.params != self.sliced.layout.params:
            raise LayoutError("cos2p mask does not give the sliced artifact's structure")

    # ------------------------------------------------------------ training
    def start(self, weights: FloatArray | None, lr: float, rng: np.random.Generator) -> None:
        self._full = self.primary.get_params() if weights is None else np.array(weights, dtype=np.float32)
        self._rng = rng
        self.sliced.set_lr(lr)
        self.mask_backend.set_lr(self.mask_lr)
        self.load_state()
        if self.mask is None and not self.learning:
            if self.mask_kind == "random":
                self.set_mask({g: random_mask(self.layout.groups[g], self.keep, rng) for g in self.groups})
            else:  # past the mask rounds without a mask (a device that joined late): learn none, sample
                self._freeze()
            self.save_state()
        if self.learning:
            self.mask, self.sub = None, None
            if self.scores is None:
                logit = math.log(self.keep / (1.0 - self.keep)) if self.keep < 1.0 else 4.0
                self.scores = np.full(self.mask_backend.layout.total, logit, dtype=np.float32)
            self.mask_backend.set_params(self.scores)

    def _freeze(self) -> None:
        if self.scores is None:
            self.scores = np.zeros(self.mask_backend.layout.total, dtype=np.float32)
        parts = self.mask_backend.layout.split(self.scores)
        self.set_mask({g: sample_mask(parts[SCORE_PREFIX + g], self.keep, self._rng) for g in self.groups})

    def before_step(self, step: int, feeds: MutableFeeds) -> TrainingBackend:
        if self.sub is None and self.learning and step < self._mask_budget(feeds):
            return self._mask_step(feeds)
        if self.sub is None:
            self.scores = self.mask_backend.get_params()
            self._freeze()
            self.save_state()
        if not self._loaded:
            assert self.sub is not None
            self.sliced.set_params(self.sub.extract(self._full))
            self._loaded = True
        feeds[KD_GATE] = np.array([1.0 if self.kd_on else 0.0], dtype=np.float32)
        return self.sliced

    def _mask_budget(self, feeds: MutableFeeds) -> int:
        """The first ⌊mask_fraction · steps⌋ steps of a mask round learn scores (the authors split
        a mask round's budget by `mask_round_ratio` 0.5), at least one weight step is left."""
        return min(math.floor(self.mask_fraction * self.total_steps), self.total_steps - 1)

    def _mask_step(self, feeds: MutableFeeds) -> TrainingBackend:
        scores = self.mask_backend.get_params()
        parts = self.mask_backend.layout.split(scores)
        for name, value in self.layout.split(self._full).items():
            feeds[name] = value
        kept = 0.0
        for g in self.groups:
            s = parts[SCORE_PREFIX + g]
            draw = (self._rng.random(s.size) < _sigmoid(s)).astype(np.float32)
            feeds[SAMPLE_PREFIX + g] = draw
            feeds[REF_PREFIX + g] = np.array(s, dtype=np.float32)
            kept += float(draw.sum())
        feeds[KEEP_TARGET] = np.array([self.keep], dtype=np.float32)
        self.mask_steps += 1
        self.kept_sum += kept / scores.size
        return self.mask_backend

    def trained(self) -> FloatArray:
        if self.sub is not None and self._loaded:
            self._full = self.sub.scatter(self._full, self.sliced.get_params())
        return self._full.copy()

    def report(self) -> dict[str, float]:
        return {"model_rate": self.keep, "mask_steps": self.mask_steps,
                "mask_kept_mean": self.kept_sum / self.mask_steps if self.mask_steps else 0.0,
                "kd_on": 1.0 if self.kd_on else 0.0}

    def pack(self, received: FloatArray, trained: FloatArray, form: str) -> UpdateBody:
        if self.sub is None:
            raise LayoutError("cos2p: no mask was frozen this round (no weight step ran)")
        idx = self.sub.indices
        delta = (trained - received)[idx].astype(np.float32)
        return UpdateBody(form="delta", values=delta, report=self.report(), indices=idx)


def mask_indices(layout: ParamLayout, mask: Mapping[str, IndexArray]) -> IndexArray:
    """The flat coordinates (of `layout`) a mask covers: what an honest device uploads."""
    return Submodel.of(layout, mask).indices
