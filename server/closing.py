"""When a round closes: the close policies a `Strategy` (server/policies.py) is built from. Each
sees a `RoundView` of the engine's state and says whether to close now, and when the deadline is.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

# How tasks go out. "round": only at round start, to every idle device (sync FedAvg, stragglers
# dropped at close). "semi": at round start to every idle device, and mid-round to devices that
# have not taken part in this round yet (joiners, failed tasks); devices whose update was taken
# wait for the next global model (methods.md §1.4). "continuous": any idle device gets the latest
# model at once, up to the concurrency limit (FedBuff, FedAsync).
DISPATCH_MODES = ("round", "semi", "continuous")


@dataclass(frozen=True)
class RoundView:
    """What a close policy may look at."""

    now_s: float
    round_started_s: float
    n_pending: int  # accepted updates waiting for this round's merge
    n_outstanding: int  # tasks handed out and not yet answered, abandoned or timed out
    n_active: int  # devices online now
    median_task_s: float | None  # median task time over the online fleet; None until half were timed


class ClosePolicy(ABC):
    dispatch: ClassVar[str]
    abandon_at_close: ClassVar[bool]  # stragglers' tasks are cancelled when the round closes

    def deadline_at(self, view: RoundView) -> float | None:
        """Absolute clock time at which the round may close with fewer updates, or None."""
        return None

    @abstractmethod
    def should_close(self, view: RoundView) -> str | None:
        """The reason to close now, or None to keep waiting. Never closes with zero updates."""


def _adaptive_deadline(deadline_s: float | None, factor: float, view: RoundView) -> float | None:
    # methods.md §1.4: default D ≈ 1.5 × the median client round time. Until half the fleet has
    # been timed there is no deadline, so the first round waits for K (or for everyone).
    if deadline_s is not None:
        return view.round_started_s + deadline_s
    if view.median_task_s is None or view.median_task_s <= 0:
        return None
    return view.round_started_s + factor * view.median_task_s


@dataclass(frozen=True)
class CloseAll(ClosePolicy):
    """Sync FedAvg: wait for every task of the round (offline devices' tasks are abandoned)."""

    dispatch: ClassVar[str] = "round"
    abandon_at_close: ClassVar[bool] = True

    def should_close(self, view: RoundView) -> str | None:
        if view.n_pending >= 1 and view.n_outstanding == 0:
            return f"all {view.n_pending} updates in"
        return None


@dataclass(frozen=True)
class CloseDeadline(ClosePolicy):
    """FedAvg with a deadline: close when all are in or the deadline passed; drop stragglers."""

    deadline_s: float | None = None  # None: deadline_factor × median task time of the fleet
    deadline_factor: float = 1.5
    dispatch: ClassVar[str] = "round"
    abandon_at_close: ClassVar[bool] = True

    def deadline_at(self, view: RoundView) -> float | None:
        return _adaptive_deadline(self.deadline_s, self.deadline_factor, view)

    def should_close(self, view: RoundView) -> str | None:
        if view.n_pending == 0:
            return None
        if view.n_outstanding == 0:
            return f"all {view.n_pending} updates in"
        deadline = self.deadline_at(view)
        if deadline is not None and view.now_s >= deadline:
            return f"deadline passed with {view.n_pending} updates, {view.n_outstanding} stragglers dropped"
        return None


@dataclass(frozen=True)
class CloseKOrDeadline(ClosePolicy):
    """Semi-async (Co-S²P, methods.md §1.4): K = ceil(k_fraction · N_active) updates or the
    deadline, whichever first. Stragglers keep training on their stale base."""

    k: int | None = None  # fixed K; None: ceil(k_fraction × devices online)
    k_fraction: float = 0.5
    deadline_s: float | None = None
    deadline_factor: float = 1.5
    dispatch: ClassVar[str] = "semi"
    abandon_at_close: ClassVar[bool] = False

    def k_for(self, n_active: int) -> int:
        if self.k is not None:
            return self.k
        return max(1, math.ceil(self.k_fraction * n_active))

    def deadline_at(self, view: RoundView) -> float | None:
        return _adaptive_deadline(self.deadline_s, self.deadline_factor, view)

    def should_close(self, view: RoundView) -> str | None:
        if view.n_pending == 0:
            return None
        k = self.k_for(view.n_active)
        if view.n_pending >= k:
            return f"K={k} of N={view.n_active} updates in"
        if view.n_outstanding == 0:
            return f"no task outstanding, closing with {view.n_pending} of K={k}"
        deadline = self.deadline_at(view)
        if deadline is not None and view.now_s >= deadline:
            return f"deadline passed with {view.n_pending} of K={k} updates"
        return None


@dataclass(frozen=True)
class CloseBuffer(ClosePolicy):
    """FedBuff (K updates in the buffer) and FedAsync (K = 1)."""

    k: int = 10
    dispatch: ClassVar[str] = "continuous"
    abandon_at_close: ClassVar[bool] = False

    def should_close(self, view: RoundView) -> str | None:
        if view.n_pending >= self.k:
            return f"buffer of K={self.k} full"
        return None


