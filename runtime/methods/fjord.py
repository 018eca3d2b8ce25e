"""`fjord`, device half and spec: Ordered Dropout (Horváth et al. 2021, methods.md §6.4).

A device of tier p_max trains, for each mini-batch, the nested submodel of a width p drawn
uniformly from P ∩ (0, p_max]: the leading ⌈p·C⌉ channels of every hidden group. The result is
scattered back into the device's p_max model, which is what goes up; the server averages per
element (a nested slice is held by every tier at or above it).

Each width is its own training artifact (ONNX Runtime trains a fixed graph), listed in the
assignment largest first, with `extras.widths` in the same order. Switching costs a weight copy
out of the p_max buffer and back (measured in bench/bench_fjord.py); `resample_every = k` draws
a new width every k batches instead of every batch, and a width drawn twice in a row is not
reloaded.

Profiles: `p_max=0.5` (or `dense`, p_max = 1). [method] keys: `widths` (P, default the paper's
0.2 … 1.0), `resample_every` (1 = per batch, as in the paper), and FjORD-KD: `distill` (false),
`distill_alpha` (0.5), `distill_temperature` (1.0). With `distill`, every width below p_max is
trained with `(1 − α)·CE + α·T²·KL(teacher ‖ student)` (graph variant `kd-α-T`, models/losses.py),
the teacher being the device's p_max model on the same batch (one extra forward per such batch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from runtime.backend import LOGITS, TEACHER, MutableFeeds, TrainingBackend, kd_variant
from runtime.errors import ArtifactError, ConfigError
from runtime.layout import FloatArray
from runtime.methods.base import BackendOpener, DeviceMethod, MethodSpec
from runtime.profile import Profile, with_variant
from runtime.protocol import Assignment
from runtime.submodel import Submodel


def _width_text(p: float) -> str:
    return Profile(width=p).canonical()


class Spec(MethodSpec):
    name = "fjord"
    param_defaults: ClassVar[Mapping[str, Any]] = {"widths": [0.2, 0.4, 0.6, 0.8, 1.0], "resample_every": 1,
                                                   "distill": False, "distill_alpha": 0.5,
                                                   "distill_temperature": 1.0}
    strategy_defaults: ClassVar[Mapping[str, Any]] = {"merge": "per-element"}

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        widths = params["widths"]
        if (not isinstance(widths, (list, tuple)) or not widths
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w <= 1 for w in widths)):
            raise ConfigError(f"[method] fjord: widths must be a list of numbers in (0, 1], got {widths!r}")
        ws = sorted({float(w) for w in widths})
        if ws[-1] != 1.0:
            raise ConfigError(f"[method] fjord: widths {ws} must include 1.0 (the full model)")
        k = params["resample_every"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"[method] fjord: resample_every must be an integer >= 1, got {k!r}")
        if not isinstance(params["distill"], bool):
            raise ConfigError(f"[method] fjord: distill must be true or false, got {params['distill']!r}")
        alpha, temperature = params["distill_alpha"], params["distill_temperature"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ConfigError(f"[method] fjord: distill_alpha must be in [0, 1], got {alpha!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"[method] fjord: distill_temperature must be > 0, got {temperature!r}")
        return {"widths": ws, "resample_every": k, "distill": params["distill"], "distill_alpha": float(alpha),
                "distill_temperature": float(temperature)}

    def p_max(self, text: str, params: Mapping[str, Any] | None) -> float:
        text = text.strip()
        if text == "dense":
            return 1.0
        key, sep, value = text.partition("=")
        if key.strip() != "p_max" or not sep:
            raise ConfigError(f"method 'fjord' takes profiles 'p_max=<width>' or 'dense', got {text!r}")
        try:
            p = float(value)
        except ValueError:
            raise ConfigError(f"fjord profile {text!r}: p_max {value.strip()!r} is not a number") from None
        if not 0.0 < p <= 1.0:
            raise ConfigError(f"fjord profile {text!r}: p_max {p:g} is outside (0, 1]")
        if params is not None and not any(math.isclose(p, w) for w in params["widths"]):
            raise ConfigError(f"fjord profile {text!r}: p_max {p:g} is not one of the widths {params['widths']}")
        return p

    def parse_profile(self, text: str, params: Mapping[str, Any] | None) -> str:
        p = self.p_max(text, params)
        return "dense" if p == 1.0 else f"p_max={p:g}"

    def widths_up_to(self, profile: str, params: Mapping[str, Any]) -> list[float]:
        p = self.p_max(profile, params)
        return sorted((w for w in params["widths"] if w <= p + 1e-12), reverse=True)

    def artifact_profiles(self, profile: str, params: Mapping[str, Any]) -> tuple[str, ...]:
        top, *below = self.widths_up_to(profile, params)
        variant = kd_variant(params["distill_alpha"], params["distill_temperature"]) if params["distill"] else None
        return (_width_text(top), *(with_variant(_width_text(w), variant) for w in below))

    def extras(self, profile: str, params: Mapping[str, Any]) -> dict[str, Any]:
        return {"widths": self.widths_up_to(profile, params), "resample_every": params["resample_every"],
                "distill": params["distill"]}


SPEC = Spec()


class Device(DeviceMethod):
    def __init__(self, assignment: Assignment, open_backend: BackendOpener) -> None:
        super().__init__(assignment, open_backend)
        extras = assignment.extras
        widths = [float(w) for w in extras.get("widths", [])]
        if len(widths) != len(assignment.artifact_keys):
            raise ConfigError(f"fjord assignment has {len(assignment.artifact_keys)} artifacts for widths {widths}")
        self.resample_every = int(extras.get("resample_every", 1))
        self.distill = bool(extras.get("distill", False))  # every width below p_max learns from p_max
        self.widths = widths
        full = self.primary.layout
        self.levels: list[tuple[TrainingBackend, Submodel]] = []
        for key in assignment.artifact_keys:
            backend = self.primary if key == assignment.primary_key else open_backend(key)
            sub_groups = backend.layout.groups
            if any(sub_groups.get(g, n) > n for g, n in full.groups.items()):
                raise ArtifactError(f"fjord artifact {key} is wider than the p_max artifact")
            # Nested leading channels: a width-p slice of the p_max model keeps its first k_p channels.
            imap = {g: np.arange(k, dtype=np.int64) for g, k in sub_groups.items() if k != full.groups[g]}
            sub = Submodel.of(full, imap)
            if sub.sub_layout.fingerprint() != backend.layout.fingerprint():
                raise ArtifactError(f"fjord artifact {key} is not the leading slice of the p_max artifact")
            self.levels.append((backend, sub))
        self.visits = [0] * len(self.levels)
        self.switches = 0
        self._full: FloatArray = np.zeros(full.total, dtype=np.float32)
        self._loaded: int | None = None
        self._level = 0
        self._rng = np.random.default_rng(0)

    def start(self, weights: FloatArray | None, lr: float, rng: np.random.Generator) -> None:
        self._full = (self.primary.get_params() if weights is None else np.array(weights, dtype=np.float32))
        for backend, _ in self.levels:
            backend.set_lr(lr)
        self._rng = rng
        self._loaded = None

    def _flush(self) -> None:
        if self._loaded is not None:
            backend, sub = self.levels[self._loaded]
            self._full = sub.scatter(self._full, backend.get_params())
            self._loaded = None

    def before_step(self, step: int, feeds: MutableFeeds) -> TrainingBackend:
        if step % self.resample_every == 0:
            self._level = int(self._rng.integers(len(self.levels)))
        if self.distill and self._level != 0:
            # The teacher is the p_max model as it is now, on this batch (methods.md §6.4).
            self._flush()
            self.primary.set_params(self._full)
            feeds[TEACHER] = np.asarray(self.primary.eval_step(feeds)[LOGITS], dtype=np.float32)
        if self._loaded != self._level:
            self._flush()
            backend, sub = self.levels[self._level]
            backend.set_params(sub.extract(self._full))
            self._loaded = self._level
            self.switches += 1
        self.visits[self._level] += 1
        return self.levels[self._level][0]

    def trained(self) -> FloatArray:
        self._flush()
        return self._full.copy()

    def report(self) -> dict[str, float]:
        out = {f"steps_width_{w:g}": float(n) for w, n in zip(self.widths, self.visits)}
        out["width_switches"] = float(self.switches)
        return out
