"""The round engine's configuration and the state records it keeps (devices, tasks, updates)."""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from runtime.errors import ConfigError
from runtime.protocol import Assignment, Hello
from server.aggregate import FloatArray, IndexArray

UPDATE_KINDS = ("weights", "delta")


@dataclass(frozen=True)
class EngineConfig:
    target_version: int | None = None  # Finish once this version is published
    time_limit_s: float | None = None  # Finish this long after the engine started (engine clock)
    eval_every: int = 1  # emit Evaluate every N versions; 0 = never
    min_devices: int = 1  # hand out no task before this many devices are online (campaign start)
    task_timeout_s: float | None = None  # abandon tasks unanswered this long (lost messages)
    remember_tasks: int = 100_000  # closed task ids kept to name duplicates in the log
    max_devices: int = 10_000  # hellos from further new ids are refused: state per id stays bounded
    # Shard sizes the campaign knows: an update's n_samples is capped at them (and at the hello's).
    shard_samples: Mapping[str, int] = field(default_factory=dict)
    # With a seed, a round's devices are drawn at random from the idle ones (a simulation's
    # per-round client sampling); without one, least recently served first. Not checkpointed.
    sample_seed: int | None = None

    def __post_init__(self) -> None:
        if self.target_version is not None and self.target_version < 1:
            raise ConfigError(f"target_version={self.target_version} must be >= 1")
        for name in ("time_limit_s", "task_timeout_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name}={value} must be > 0")
        if self.eval_every < 0 or self.min_devices < 0 or self.remember_tasks < 0:
            raise ConfigError("eval_every, min_devices and remember_tasks must be >= 0")
        if self.max_devices < 1:
            raise ConfigError(f"max_devices={self.max_devices} must be >= 1")


@dataclass(slots=True)  # one per device that said hello: 100,000 in a large simulation
class DeviceRecord:
    """Engine-owned and mutable; read it through `Engine.devices`, never change it."""

    device_id: str
    hello: Hello
    online: bool = True
    state: str = "idle"  # idle | busy | done (its update is in this round; waits for the next model)
    task_id: str | None = None
    last_dispatch_s: float | None = None
    task_s: float | None = None  # last dispatch-to-update time; a lower bound if it was dropped as a straggler
    n_accepted: int = 0
    n_rejected: int = 0
    n_abandoned: int = 0
    profile_override: str | None = None  # set by the assign policy after a failure (OOM: a smaller profile)


@dataclass(frozen=True, eq=False, slots=True)
class TaskRecord:
    task_id: str
    device_id: str
    round: int
    base_version: int
    profile: str
    dispatched_s: float
    # Global coordinates; a checkpoint recomputes them from (profile, round) unless the method stores them.
    indices: IndexArray | None
    assignment: Assignment


@dataclass(frozen=True, eq=False, slots=True)
class AcceptedUpdate:
    task: TaskRecord
    staleness: int
    n_samples: int
    indices: IndexArray | None
    values: FloatArray  # in the merge's form: delta against the base, or weights
    delta_l1: float
    rate: float  # the client's model rate (its width), Co-S²P's rate_i
    coord_weights: FloatArray | None = None  # a method's weight per value (per-element merges only)


class TaskTimeMedian:
    """Median of the devices' task times over the online fleet, kept incrementally (a sorted list
    and a count) because the engine consults it on every event.

    A device never timed counts as +inf (unknown, maybe slow): averaging only the updates that
    came back would be biased toward fast devices (stragglers dropped at a deadline never report),
    and a deadline derived from it would ratchet down. So the median is None until half the
    online fleet has been timed, and stragglers enter with their elapsed time as a lower bound.
    """

    def __init__(self) -> None:
        self._sorted: list[float] = []
        self._untimed = 0

    def add(self, task_s: float | None) -> None:
        if task_s is None:
            self._untimed += 1
        else:
            bisect.insort(self._sorted, task_s)

    def remove(self, task_s: float | None) -> None:
        if task_s is None:
            self._untimed -= 1
        else:
            del self._sorted[bisect.bisect_left(self._sorted, task_s)]

    def slowest(self) -> float | None:
        """The longest task time over the online fleet; None while any online device is untimed
        (it may be the slowest) or none is online."""
        if self._untimed or not self._sorted:
            return None
        return self._sorted[-1]

    def median(self) -> float | None:
        total = len(self._sorted) + self._untimed
        if total == 0:
            return None
        k = (total - 1) // 2  # lower median: the time by which half the fleet is done
        value = self._sorted[k] if k < len(self._sorted) else math.inf
        return value if math.isfinite(value) else None


class IdleQueue:
    """The online idle devices, least recently served first, as a heap with lazy deletion.

    The engine dispatches on almost every event; sorting every idle device each time made
    dispatch O(idle · log idle) per event (the largest cost at 100,000 simulated devices). A
    device's key (last dispatch time, id) cannot change while it is idle (only a dispatch sets
    it, and a dispatch takes it out), so a heap gives the same order: ids are unique, no ties.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._members: dict[str, tuple[float, str]] = {}  # id -> its key in the heap

    def add(self, device_id: str, last_dispatch_s: float | None) -> None:
        if device_id in self._members:
            return
        key = (-math.inf if last_dispatch_s is None else last_dispatch_s, device_id)
        self._members[device_id] = key
        heapq.heappush(self._heap, key)

    def discard(self, device_id: str) -> None:
        if self._members.pop(device_id, None) is not None and len(self._heap) > 2 * len(self._members) + 64:
            self._heap = list(self._members.values())  # drop the dead entries; amortised O(1)
            heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._members)

    def __bool__(self) -> bool:
        return bool(self._members)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def least_recent(self, n: int) -> list[str]:
        """The `n` least recently served idle devices, in that order; they stay members."""
        out: list[tuple[float, str]] = []
        while self._heap and len(out) < n:
            key = heapq.heappop(self._heap)
            if self._members.get(key[1]) == key and (not out or out[-1] != key):
                out.append(key)
        for key in out:
            heapq.heappush(self._heap, key)
        return [key[1] for key in out]
