"""The small pieces a strategy is made of: how updates are weighted, how they merge, and which
profile (submodel) each device trains; when a round closes is `server/closing.py`'s.

A `Strategy` is a named composition of one close policy, one weight policy and one merge
policy plus a staleness cap and a concurrency limit (see `server/strategies/`). The engine
(`server/engine.py`) owns all state; these pieces are stateless and see only what they need.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from runtime.errors import ConfigError, RoundError
from runtime.protocol import Hello
from server import aggregate as agg
from server import weighting
from server.aggregate import FloatArray, IndexArray, UpdateContribution
from server.closing import ClosePolicy
from server.robust import RobustConfig


# ---------------------------------------------------------------- weight
@dataclass(frozen=True)
class WeightInput:
    n_samples: int
    staleness: int  # version at acceptance − base version
    delta_l1: float  # ‖Δ_i‖_1
    rate: float  # the client's model rate (its width; Co-S²P's rate_i)
    base_version: int
    # ‖W^(t) − W^(v)‖_1 for a base version v, computed (once per version) only if a policy asks.
    drift_of: Callable[[int], float] = field(repr=False, compare=False)

    @property
    def drift_l1(self) -> float:
        return self.drift_of(self.base_version)


class WeightPolicy(ABC):
    @abstractmethod
    def weights(self, items: Sequence[WeightInput]) -> list[float]:
        """Raw weight γ̃_i per update; the merge decides whether to normalise."""


@dataclass(frozen=True)
class SampleWeight(WeightPolicy):
    """FedAvg: n_i. If every update reports 0 samples, all weigh the same."""

    def weights(self, items: Sequence[WeightInput]) -> list[float]:
        if all(it.n_samples == 0 for it in items):
            return [1.0] * len(items)
        return [float(it.n_samples) for it in items]


STALENESS_FUNCTIONS = ("polynomial", "sqrt", "hinge", "constant")


@dataclass(frozen=True)
class StalenessWeight(WeightPolicy):
    """`scale · s(staleness)` (× n_i if by_samples). FedAsync uses scale = α, FedBuff sqrt."""

    function: str = "polynomial"
    a: float = 0.5
    b: float = 4.0
    scale: float = 1.0
    by_samples: bool = False

    def factor(self, staleness: int) -> float:
        if self.function == "polynomial":
            return weighting.staleness_polynomial(staleness, self.a)
        if self.function == "sqrt":
            return weighting.staleness_sqrt(staleness)
        if self.function == "hinge":
            return weighting.staleness_hinge(staleness, self.a, self.b)
        return weighting.staleness_constant(staleness)

    def weights(self, items: Sequence[WeightInput]) -> list[float]:
        return [
            self.scale * self.factor(it.staleness) * (float(it.n_samples) if self.by_samples else 1.0)
            for it in items
        ]


@dataclass(frozen=True)
class CoS2PWeight(WeightPolicy):
    """Co-S²P importance over staleness, normalised over the round (methods.md §1.3)."""

    def weights(self, items: Sequence[WeightInput]) -> list[float]:
        gammas = weighting.cos2p_weights(
            [it.delta_l1 for it in items], [it.rate for it in items], [it.drift_l1 for it in items]
        )
        return [float(g) for g in gammas]


# ---------------------------------------------------------------- merge
class MergePolicy(ABC):
    form: ClassVar[str] = "delta"  # what contribution.values hold: "delta" (vs its base) or "weights"
    accepts_submodels: ClassVar[bool] = True
    server_lr: float = 1.0  # the step a robust rule's per-coordinate delta is applied with

    @abstractmethod
    def merge(self, global_flat: FloatArray, contributions: Sequence[UpdateContribution]) -> FloatArray:
        """A new global buffer; raises RoundError and leaves `global_flat` untouched on bad input."""


def _normalised(contributions: Sequence[UpdateContribution]) -> list[UpdateContribution]:
    total = sum(c.weight for c in contributions)
    if not total > 0:
        raise RoundError(f"weights of {len(contributions)} updates sum to {total}, need > 0")
    return [UpdateContribution(c.indices, c.values, c.weight / total, c.coord_weights) for c in contributions]


@dataclass(frozen=True)
class DenseMerge(MergePolicy):
    """FedAvg `W + Σ γ_i Δ_i / Σ γ_i` over full-model deltas; equals `Σ n_i w_i / Σ n_i` when
    every update starts from the current model (sync rounds)."""

    accepts_submodels: ClassVar[bool] = False
    server_lr: float = 1.0

    def merge(self, global_flat: FloatArray, contributions: Sequence[UpdateContribution]) -> FloatArray:
        return agg.apply_deltas(global_flat, _normalised(contributions), self.server_lr)


@dataclass(frozen=True)
class PerElementMerge(MergePolicy):
    """HeteroFL/FedRolex/FjORD/Chen & Qin: per-coordinate weighted average of the covering deltas."""

    server_lr: float = 1.0

    def merge(self, global_flat: FloatArray, contributions: Sequence[UpdateContribution]) -> FloatArray:
        return agg.per_element_delta(global_flat, contributions, self.server_lr)


@dataclass(frozen=True)
class MaskedDeltaMerge(MergePolicy):
    """Co-S²P / ZeroFL: γ L1-normalised, `W + η Σ γ_i Δ_i` scattered, no per-coordinate norm."""

    server_lr: float = 1.0

    def merge(self, global_flat: FloatArray, contributions: Sequence[UpdateContribution]) -> FloatArray:
        return agg.masked_delta_merge(global_flat, contributions, self.server_lr)


@dataclass(frozen=True)
class BufferMerge(MergePolicy):
    """FedBuff flush: `W + η_g Σ s_i Δ_i / K`."""

    server_lr: float = 1.0

    def merge(self, global_flat: FloatArray, contributions: Sequence[UpdateContribution]) -> FloatArray:
        return agg.fedbuff_apply(global_flat, contributions, self.server_lr)


@dataclass(frozen=True)
class MixMerge(MergePolicy):
    """FedAsync: `W ← (1 − α_t) W + α_t w_new` per update, in arrival order."""

    form: ClassVar[str] = "weights"

    def merge(self, global_flat: FloatArray, contributions: Sequence[UpdateContribution]) -> FloatArray:
        out = global_flat
        for c in contributions:
            out = agg.fedasync_mix(out, c)
        return out


# ---------------------------------------------------------------- assign
class ModelOps(Protocol):
    """What the engine needs to know about the model: its size, which global coordinates a
    structural profile trains in a round (`runtime.submodel` computes these from a ParamLayout),
    and the key of its artifact."""

    @property
    def n_params(self) -> int: ...

    def indices_for(self, profile: str, round_index: int) -> IndexArray | None:
        """Flat indices into the global buffer for `profile` in `round_index`; None = full model."""
        ...

    def artifact_key(self, profile: str) -> str:
        """The artifact key of structural `profile`; ConfigError if there is none."""
        ...


@dataclass(frozen=True)
class DenseModel:
    """Every profile trains the full model; artifact keys are the profile strings."""

    n_params: int

    def indices_for(self, profile: str, round_index: int) -> IndexArray | None:
        return None

    def artifact_key(self, profile: str) -> str:
        return profile


@dataclass(frozen=True)
class TableModel:
    """Fixed index array per profile name (e.g. precomputed HeteroFL tiers); "dense" = full model."""

    n_params: int
    table: Mapping[str, IndexArray | None] = field(default_factory=dict)

    def indices_for(self, profile: str, round_index: int) -> IndexArray | None:
        if profile == "dense":
            return None
        if profile not in self.table:
            raise ConfigError(f"no index array for profile {profile!r}; known: {sorted(self.table)}")
        return self.table[profile]

    def artifact_key(self, profile: str) -> str:
        self.indices_for(profile, 0)
        return profile


class AssignPolicy(ABC):
    @abstractmethod
    def profile_for(self, device_id: str, hello: Hello, round_index: int) -> str:
        """The profile `device_id` trains in `round_index`."""

    def after_failure(self, device_id: str, hello: Hello, profile: str, failure: str | None) -> str | None:
        """The engine calls this when `device_id` reports its task (trained under `profile`)
        failed, `failure` one of runtime.protocol.FAILURES (None from an old device). Return the
        profile the device should train from now on instead, or None to keep assigning as
        before. Policies stay stateless: the engine remembers the answer per device
        (`DeviceRecord.profile_override`, checkpointed with it)."""
        return None


@dataclass(frozen=True)
class FixedProfile(AssignPolicy):
    profile: str = "dense"

    def profile_for(self, device_id: str, hello: Hello, round_index: int) -> str:
        return self.profile


@dataclass(frozen=True)
class ProfileByDevice(AssignPolicy):
    """Server-assigned tiers by device id (a campaign lists them). `DEVICE_CHOICE` for a device:
    the first profile of its hello (a device tiering itself by resources, runtime/tiering.py)."""

    profiles: Mapping[str, str]
    default: str = "dense"

    def profile_for(self, device_id: str, hello: Hello, round_index: int) -> str:
        profile = self.profiles.get(device_id, self.default)
        if profile == DEVICE_CHOICE:
            return hello.profiles[0] if hello.profiles else self.default
        return profile


class Shrinks(Protocol):
    """The part of a method's server half the OOM fallback uses (server/methods/base.py)."""

    def smaller(self, profile: str, offered: tuple[str, ...]) -> list[str]: ...

    def can_assign(self, profile: str) -> bool: ...


DEVICE_CHOICE = "device"  # an [assign] entry meaning: the profile the device chose


@dataclass(frozen=True)
class DowngradeOnOom(AssignPolicy):
    """Wraps another assign policy: a device whose task failed with failure "oom" is moved to the
    next smaller profile its Hello lists that the method can assign (its artifacts exist); what
    "smaller" means is the method's (`ServerMethod.smaller`). DESIGN: "retries with a smaller
    profile"."""

    inner: AssignPolicy
    method: Shrinks

    def profile_for(self, device_id: str, hello: Hello, round_index: int) -> str:
        return self.inner.profile_for(device_id, hello, round_index)

    def after_failure(self, device_id: str, hello: Hello, profile: str, failure: str | None) -> str | None:
        if failure != "oom":
            return self.inner.after_failure(device_id, hello, profile, failure)
        for candidate in self.method.smaller(profile, hello.profiles):
            if self.method.can_assign(candidate):
                return candidate
        return None  # nothing smaller to offer: keep the profile, the device may fail again


# ---------------------------------------------------------------- strategy
@dataclass(frozen=True)
class Strategy:
    name: str
    close: ClosePolicy
    weight: WeightPolicy
    merge: MergePolicy
    max_staleness: int | None  # updates with version − base_version above this are dropped
    # Updates older (arrival − dispatch) than this many times the slowest online device's task
    # time are dropped; None = no bound in time. Relative to the slowest device, so a device that
    # is merely slow is never starved (see README, "Staleness without starvation").
    max_age_factor: float | None = None
    concurrency: int | None = None  # most tasks out at once; None = every available device
    params: Mapping[str, Any] = field(default_factory=dict)  # as configured, for logs and checkpoints
    robust: RobustConfig = field(default_factory=RobustConfig)  # norm bound and robust rule (server/robust.py)
