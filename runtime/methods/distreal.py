"""`distreal`, device half and spec: DISTREAL (Rapp et al., AAAI 2022; methods.md §2).

Per-layer filter dropout. A dropout vector d gives, per hidden group g, the share of its C_g
channels (conv filters) left out. For each mini-batch (every `resample_every`), the device draws
k_g = ceil((1 − d_g)·C_g) channels of every group at random, loads those coordinates of its full
weights into the physically smaller graph of that vector (one training artifact per vector, its
thinned activations scaled by C_g/k_g: inverted dropout, models/builder), trains one step and
scatters the result back. The subset changes per batch, so every filter trains over a round and
the device uploads its full dense model; the server runs FedAvg with a deadline.

Self-selection, with no help from the server (methods.md §2.2 step 3). The front (from
`orchard dse`) lists each vector's profiled board time per mini-batch t̂(d) and its convergence
score (accuracy after a fixed time budget). Every `recheck_every` mini-batches the device
estimates its slowdown r = (measured ms per batch) / t̂ over the batches since the last change of
its cgroup CPU quota; a quota change rescales r at once (old / new quota), before any batch has
been timed under it. It then picks the best-scoring vector whose remaining batches fit in
`time_margin` × the time left to the task's deadline, or the cheapest if none fits (no deadline:
the best); once the deadline has passed it gives the task up (a TrainerError), so a late task
does not hold up the next one. Every change is recorded (t, vector, reason) in the update's report as `choice.<i>.*`
and the steps trained per vector as `steps.<i>`.

Profile: `dense` (which vector trains is the device's choice). [method] keys: `pareto` (a front
file written by `orchard dse`; loaded into `front` when the campaign is read, so the server and
devices never need the path), `uniform_rate` (Federated Dropout, Caldas et al.: one uniform
vector d = rate·1 for every batch, no selection; -1 = off), `resample_every`, `recheck_every`,
`time_margin`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from runtime.backend import MutableFeeds, TrainingBackend
from runtime.errors import ArtifactError, ConfigError, TrainerError
from runtime.layout import FloatArray
from runtime.methods.base import BackendOpener, DeviceMethod, MethodSpec
from runtime.profile import Profile, with_variant
from runtime.protocol import Assignment
from runtime.submodel import Submodel, kept_channels

FRONT_FORMAT = 1
FD_VARIANT = "fd"  # models/losses.py: the graph with inverted-dropout activation scaling
UPGRADE_MARGIN = 0.85
WINDOW_S = 0.5  # throughput is averaged over at least this much wall time (several CFS periods)
MAX_CHOICES = 32  # choices recorded per task (a thrashing device must not grow the report without bound)
REASONS = ("no deadline", "fits", "none fits: cheapest", "fixed", "not yet measured")
# The last task's slowdown and quota per artifact set, kept by the long-lived trainer child: a
# task starts from the throughput its predecessor measured instead of from nothing.
_LAST: dict[str, tuple[float, float | None]] = {}
_NUMBER = (int, float)


def vector_profile(drop: Mapping[str, float]) -> str:
    """The structural profile of a dropout vector (`dense` when nothing is dropped)."""
    return Profile(drop=tuple(sorted((str(g), float(r)) for g, r in drop.items()))).canonical()


def _rate(where: str, group: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, _NUMBER) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{where}: dropout rate {group}={value!r} is outside [0, 1)")
    return float(value)


def check_front(front: Any, where: str) -> dict[str, Any]:
    """A front (the JSON of a Pareto file) checked and normalised; ConfigError names what is wrong."""
    if not isinstance(front, Mapping):
        raise ConfigError(f"{where}: a Pareto front must be a JSON object, got {type(front).__name__}")
    if front.get("format") != FRONT_FORMAT:
        raise ConfigError(f"{where}: Pareto format {front.get('format')!r}, expected {FRONT_FORMAT}")
    model, groups, vectors = front.get("model"), front.get("groups"), front.get("vectors")
    if not isinstance(model, str) or not isinstance(groups, Mapping) or not groups:
        raise ConfigError(f"{where}: a Pareto front needs 'model' and its droppable 'groups' with channel counts")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in groups.values()):
        raise ConfigError(f"{where}: Pareto group channel counts {dict(groups)} must be positive integers")
    if not isinstance(vectors, list) or not vectors:
        raise ConfigError(f"{where}: the Pareto front is empty (no vectors)")
    out: list[dict[str, Any]] = []
    for i, v in enumerate(vectors):
        if not isinstance(v, Mapping) or not isinstance(v.get("drop"), Mapping):
            raise ConfigError(f"{where}: Pareto vector {i} has no 'drop' table")
        unknown = sorted(set(v["drop"]) - set(groups))
        if unknown:
            raise ConfigError(f"{where}: Pareto vector {i} drops group {unknown[0]!r}, not one of {sorted(groups)}")
        drop = {str(g): _rate(f"{where}: Pareto vector {i}", str(g), r) for g, r in v["drop"].items()}
        figures = {}
        for key in ("step_ms", "score"):
            value = v.get(key)
            if isinstance(value, bool) or not isinstance(value, _NUMBER) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{where}: Pareto vector {i}: {key} {value!r} is not a finite number >= 0")
            figures[key] = float(value)
        if figures["step_ms"] <= 0:
            raise ConfigError(f"{where}: Pareto vector {i}: step_ms {figures['step_ms']!r} must be > 0")
        extra = {k: v[k] for k in ("flops_ratio", "host_step_ms") if isinstance(v.get(k), _NUMBER)}
        out.append({"drop": drop, **figures, **extra})
    # Only what a device or the build needs travels on (the search's own record stays in the file).
    kept = {k: front[k] for k in ("board", "batch_size", "input_shape", "num_classes") if k in front}
    return {"format": FRONT_FORMAT, **kept, "model": model, "groups": {str(g): int(n) for g, n in groups.items()},
            "vectors": out}


def load_front(path: str) -> dict[str, Any]:
    """Read and check a Pareto file; ConfigError naming the file and the fault."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"Pareto file {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"Pareto file {path} is corrupt: {exc}") from None
    return check_front(data, f"Pareto file {path}")


class Spec(MethodSpec):
    name = "distreal"
    param_defaults: ClassVar[Mapping[str, Any]] = {"pareto": "", "front": {}, "uniform_rate": -1.0,
                                                   "resample_every": 1, "recheck_every": 4, "time_margin": 0.9}

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        pareto, front, rate = params["pareto"], params["front"], params["uniform_rate"]
        if not isinstance(pareto, str):
            raise ConfigError(f"[method] distreal: pareto must be a file path, got {pareto!r}")
        if isinstance(rate, bool) or not isinstance(rate, _NUMBER) or not (rate == -1 or 0.0 <= rate < 1.0):
            raise ConfigError(f"[method] distreal: uniform_rate {rate!r} is outside [0, 1) (-1: off)")
        if pareto:
            front = load_front(pareto)
        elif front:
            front = check_front(front, "[method] distreal front")
        # No front yet is allowed here (a spec's defaults must load: the isolation probe, `Inferred`);
        # everything that needs one (artifacts, tasks, the build) asks `vectors`, which refuses.
        for key in ("resample_every", "recheck_every"):
            k = params[key]
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ConfigError(f"[method] distreal: {key} must be an integer >= 1, got {k!r}")
        margin = params["time_margin"]
        if isinstance(margin, bool) or not isinstance(margin, _NUMBER) or not 0.0 < margin <= 1.0:
            raise ConfigError(f"[method] distreal: time_margin {margin!r} is outside (0, 1]")
        return {"pareto": "", "front": front, "uniform_rate": float(rate), "resample_every": params["resample_every"],
                "recheck_every": params["recheck_every"], "time_margin": float(margin)}

    def vectors(self, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The vectors a device may train: the front's, or the one uniform vector."""
        front = params["front"]
        if not front:
            raise ConfigError("[method] distreal needs pareto = <file from `orchard dse`>")
        if params["uniform_rate"] >= 0:
            rate = params["uniform_rate"]
            return [{"drop": {g: rate for g in front["groups"]}, "step_ms": 1.0, "score": 0.0}]
        return list(front["vectors"])

    def parse_profile(self, text: str, params: Mapping[str, Any] | None) -> str:
        if text.strip() != "dense":
            raise ConfigError(f"method 'distreal' takes profile 'dense' (the device picks its own dropout "
                              f"vector), got {text!r}")
        return "dense"

    def vector_artifacts(self, params: Mapping[str, Any]) -> list[str]:
        """Per vector, the artifact profile it trains (`dense` for the zero vector)."""
        out = []
        for v in self.vectors(params):
            profile = vector_profile(v["drop"])
            out.append(profile if profile == "dense" else with_variant(profile, FD_VARIANT))
        return out

    def artifact_profiles(self, profile: str, params: Mapping[str, Any]) -> tuple[str, ...]:
        rest = [p for p in dict.fromkeys(self.vector_artifacts(params)) if p != "dense"]
        return ("dense", *rest)

    def extras(self, profile: str, params: Mapping[str, Any]) -> dict[str, Any]:
        order = list(self.artifact_profiles(profile, params))
        vectors = [{"drop": v["drop"], "step_ms": v["step_ms"], "score": v["score"], "artifact": order.index(a)}
                   for v, a in zip(self.vectors(params), self.vector_artifacts(params))]
        return {"vectors": vectors, "groups": params["front"]["groups"], "select": params["uniform_rate"] < 0,
                "resample_every": params["resample_every"], "recheck_every": params["recheck_every"],
                "time_margin": params["time_margin"]}


SPEC = Spec()


def choose(vectors: list[dict[str, Any]], remaining_steps: int, slowdown: list[float],
           time_left_s: float | None, margin: float, current: int = -1) -> tuple[int, int]:
    """(vector index, reason index into REASONS): the best score whose remaining steps fit in
    margin × the time left at its `slowdown` × its profiled step time, else the cheapest. A vector
    dearer than `current` must fit with UPGRADE_MARGIN to spare: a slowdown measured on one vector
    transfers imperfectly to another, and without it a device near the edge flips every re-check."""
    best = max(range(len(vectors)), key=lambda i: (vectors[i]["score"], -vectors[i]["step_ms"]))
    if time_left_s is None:
        return best, 0
    step_ms = [float(v["step_ms"]) for v in vectors]
    now_ms = step_ms[current] if current >= 0 else math.inf

    def fits(i: int) -> bool:
        room = margin * max(0.0, time_left_s) * (UPGRADE_MARGIN if step_ms[i] > now_ms else 1.0)
        return remaining_steps * step_ms[i] * slowdown[i] / 1e3 <= room

    fitting = [i for i in range(len(vectors)) if fits(i)]
    if fitting:
        return max(fitting, key=lambda i: (vectors[i]["score"], -vectors[i]["step_ms"])), 1
    return min(range(len(vectors)), key=lambda i: vectors[i]["step_ms"]), 2


class Device(DeviceMethod):
    def __init__(self, assignment: Assignment, open_backend: BackendOpener,
                 quota_cores: Any | None = None) -> None:
        super().__init__(assignment, open_backend)
        extras = assignment.extras
        self.vectors: list[dict[str, Any]] = [dict(v) for v in extras.get("vectors", [])]
        if not self.vectors:
            raise ConfigError("distreal assignment lists no dropout vectors")
        self.select = bool(extras.get("select", True))
        self.resample_every = int(extras.get("resample_every", 1))
        self.recheck_every = int(extras.get("recheck_every", 4))
        self.margin = float(extras.get("time_margin", 0.9))
        full = self.primary.layout
        self.levels: list[tuple[TrainingBackend, dict[str, int]]] = []
        for i, v in enumerate(self.vectors):
            a = int(v["artifact"])
            if not 0 <= a < len(assignment.artifact_keys):
                raise ArtifactError(f"distreal vector {i} ({vector_profile(v['drop'])}) has no artifact")
            backend = self.primary if a == 0 else open_backend(assignment.artifact_keys[a])
            kept = {g: kept_channels(1.0 - float(r), full.groups[g]) for g, r in v["drop"].items()
                    if g in full.groups and kept_channels(1.0 - float(r), full.groups[g]) < full.groups[g]}
            expected = dict(full.groups, **kept)
            if dict(backend.layout.groups) != expected:
                raise ArtifactError(f"distreal artifact {assignment.artifact_keys[a]} has groups "
                                    f"{dict(backend.layout.groups)}, not those of vector "
                                    f"{vector_profile(v['drop'])}: {expected}")
            self.levels.append((backend, kept))
        if quota_cores is None:
            from runtime.telemetry import CgroupLimits  # lazily: the tests pass their own reader

            quota_cores = CgroupLimits().cpu_quota_cores
        self._quota_cores = quota_cores
        self._memory_key = "/".join(assignment.artifact_keys)
        self._full: FloatArray = np.zeros(full.total, dtype=np.float32)
        self._rng = np.random.default_rng(0)
        self._reset()

    def _reset(self) -> None:
        self.current = 0 if not self.select else -1
        self._loaded: tuple[int, Submodel | None] | None = None
        # Measured / profiled step time per vector, since the last quota change; `_slowdown` is the
        # estimate for a vector not timed since then (the last one timed, or the quota's rescale).
        self._ratios: dict[int, list[tuple[float, float, float]]] = {}  # (t, measured ms, profiled ms)
        self._slowdown = 1.0
        self._quota: float | None = None
        self._measured = False
        self._last_t: float | None = None
        self._last_vector = -1
        self.steps_per_vector = [0] * len(self.vectors)
        self.choices: list[tuple[float, int, int, float]] = []  # (t_s, vector, reason, slowdown)
        self.reloads = 0

    def start(self, weights: FloatArray | None, lr: float, rng: np.random.Generator) -> None:
        self._full = self.primary.get_params() if weights is None else np.array(weights, dtype=np.float32)
        for backend, _ in self.levels:
            backend.set_lr(lr)
        self._rng = rng
        self._reset()
        self._t0 = time.monotonic()
        remembered = _LAST.get(self._memory_key)
        if remembered is not None:
            self._slowdown, self._quota = remembered
            self._measured = True
        if not self.select:
            self.choices.append((0.0, 0, 3, 1.0))

    def _flush(self) -> None:
        if self._loaded is not None:
            level, sub = self._loaded
            trained = self.levels[level][0].get_params()
            if sub is None:
                self._full = trained
            else:
                self._full[sub.indices] = trained
            self._loaded = None

    def _observe(self, now: float) -> None:
        if self._last_t is not None and self._last_vector >= 0:
            own = self._ratios.setdefault(self._last_vector, [])
            own.append((now, (now - self._last_t) * 1e3, self.vectors[self._last_vector]["step_ms"]))
            while len(own) > 2 * self.recheck_every and own[0][0] < now - WINDOW_S:
                del own[0]
        self._last_t = now

    def _own_slowdown(self, vector: int) -> float | None:
        """Measured over profiled time of the vector's recent batches: a ratio of sums, not a
        median, because a CFS quota runs a burst of batches at full speed and then parks them."""
        own = self._ratios.get(vector, [])
        if len(own) < 2:
            return None
        return sum(m for _, m, _ in own) / sum(p for _, _, p in own)

    def _reselect(self, step: int, now: float) -> None:
        quota = self._quota_cores()
        if quota is not None and self._quota is not None and not math.isclose(quota, self._quota):
            # The quota moved: rescale at once, and forget batches timed under the old one.
            measured = self._own_slowdown(self._last_vector)
            self._slowdown = (measured if measured is not None else self._slowdown) * self._quota / quota
            self._ratios.clear()
        else:
            measured = self._own_slowdown(self._last_vector)
            if measured is not None:
                self._slowdown = measured
        self._quota = quota
        if step > 0:
            self._measured = True
            _LAST[self._memory_key] = (self._slowdown, quota)
        left = None if self.deadline_at is None else self.deadline_at - now
        slowdowns = []
        for i in range(len(self.vectors)):
            own = self._own_slowdown(i)
            slowdowns.append(self._slowdown if own is None else own)
        pick, reason = choose(self.vectors, self.total_steps - step, slowdowns, left, self.margin, self.current)
        if not self._measured:
            reason = 4
        if pick != self.current:
            self.current = pick
            if len(self.choices) < MAX_CHOICES:
                self.choices.append((now - self._t0, pick, reason, self._slowdown))

    def before_step(self, step: int, feeds: MutableFeeds) -> TrainingBackend:
        now = time.monotonic()
        if self.select and self.deadline_at is not None and now > self.deadline_at:
            # Past the deadline (less the upload's time) the update can only be refused, and
            # finishing it would make the next task start late too: give this one up.
            raise TrainerError(f"deadline passed after {step} of {self.total_steps} steps; giving up the task")
        self._observe(now)
        if self.select and step % self.recheck_every == 0:
            self._reselect(step, now)
        level = self.current
        backend, kept = self.levels[level]
        if not kept:
            if self._loaded is None or self._loaded[0] != level:
                self._flush()
                backend.set_params(self._full)
                self._loaded = (level, None)
                self.reloads += 1
        elif self._loaded is None or self._loaded[0] != level or step % self.resample_every == 0:
            self._flush()
            groups = self.primary.layout.groups
            imap = {g: np.sort(self._rng.choice(groups[g], k, replace=False)).astype(np.int64) for g, k in kept.items()}
            sub = Submodel.of(self.primary.layout, imap)
            backend.set_params(self._full[sub.indices])
            self._loaded = (level, sub)
            self.reloads += 1
        self.steps_per_vector[level] += 1
        self._last_vector = level
        return backend

    def trained(self) -> FloatArray:
        self._flush()
        return self._full.copy()

    def report(self) -> dict[str, float]:
        out = {f"steps.{i}": float(n) for i, n in enumerate(self.steps_per_vector)}
        out["reloads"] = float(self.reloads)
        for i, (t_s, vector, reason, slowdown) in enumerate(self.choices):
            out[f"choice.{i}.t_s"] = round(t_s, 4)
            out[f"choice.{i}.vector"] = float(vector)
            out[f"choice.{i}.reason"] = float(reason)
            out[f"choice.{i}.slowdown"] = round(slowdown, 4)
        return out
