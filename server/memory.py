"""In-memory transport and simulated devices on a virtual clock.

A `SimDevice` stands in for a board without ONNX Runtime: it has a speed (seconds per local
step), an availability schedule, a sample count, and a deterministic fake "training" that moves
the weights it was sent a fixed fraction of the way toward a device-specific target vector. So
FedAvg over several devices converges to the sample-weighted mean of their targets, and tests
can check real aggregation dynamics. `simulate` drives an `Engine` and N devices through a
priority queue of timed events; 1,000 devices run in seconds.
"""

from __future__ import annotations

import heapq
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from runtime.errors import ConfigError
from runtime.protocol import Hello, Update
from server import checkpoint
from server.aggregate import FloatArray, IndexArray
from server.engine import Engine, EngineConfig
from server.events import (
    DeviceHello,
    DeviceOffline,
    Evaluate,
    Event,
    Finish,
    Log,
    NewGlobal,
    SendTask,
    Tick,
    UpdateReceived,
)
from server.policies import AssignPolicy, DenseModel, ModelOps, Strategy


# ---------------------------------------------------------------- availability
class Availability(ABC):
    @abstractmethod
    def online_at(self, t: float) -> bool: ...

    @abstractmethod
    def next_change(self, t: float) -> float | None:
        """The first time strictly after `t` at which `online_at` flips, or None."""


@dataclass(frozen=True)
class AlwaysOn(Availability):
    def online_at(self, t: float) -> bool:
        return True

    def next_change(self, t: float) -> float | None:
        return None


@dataclass(frozen=True)
class Periodic(Availability):
    """On for `on_s`, off for `off_s`, repeating; `phase_s` shifts the cycle (on at t = phase)."""

    on_s: float
    off_s: float
    phase_s: float = 0.0

    def online_at(self, t: float) -> bool:
        return (t - self.phase_s) % (self.on_s + self.off_s) < self.on_s

    def next_change(self, t: float) -> float | None:
        period = self.on_s + self.off_s
        start = self.phase_s + math.floor((t - self.phase_s) / period) * period
        for edge in (start + self.on_s, start + period, start + period + self.on_s):
            if edge > t:
                return edge
        return None


@dataclass(frozen=True)
class Windows(Availability):
    """Online during each `[start_s, end_s)` window (sorted, disjoint), offline otherwise."""

    windows: tuple[tuple[float, float], ...]

    def online_at(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.windows)

    def next_change(self, t: float) -> float | None:
        edges = [x for a, b in self.windows for x in (a, b) if x > t]
        return min(edges) if edges else None


# ---------------------------------------------------------------- devices
@dataclass(frozen=True, eq=False)
class SimDevice:
    device_id: str
    target: FloatArray  # full-model weights this device's "data" pulls toward
    n_samples: int = 100
    step_s: float = 0.1  # seconds per local step
    local_steps: int = 10
    step_frac: float = 0.1  # fraction of the gap to the target closed per local step
    upload_s: float = 0.0
    availability: Availability = field(default_factory=AlwaysOn)
    kind: str = "delta"  # what it uploads: "delta" or "weights"
    redeliver: bool = False  # deliver every update twice, as a QoS-1 redelivery would
    ram_mb: int = 1024
    profiles: tuple[str, ...] = ()
    # `train` is a pure function of (base, indices): `simulate` may run it when the update is
    # delivered rather than when the task is sent, so a task in flight holds only a reference to
    # its base model (shared with the engine's history), not its own trained copy. A device whose
    # training takes real time (testbed.simulate's pool) leaves this False and starts at dispatch.
    train_at_delivery: ClassVar[bool] = True

    @property
    def duration_s(self) -> float:
        return self.local_steps * self.step_s + self.upload_s

    def train(self, base: FloatArray, indices: IndexArray | None) -> FloatArray:
        """Deterministic fake training from `base` (the submodel buffer it was sent)."""
        target = self.target if indices is None else self.target[indices]
        progress = 1.0 - (1.0 - self.step_frac) ** self.local_steps
        # The same float ops as base + progress·(target − base), in place: 1M-parameter fleets
        # spend most of their simulation time here, and each temporary is a 4 MB pass.
        moved = target - base
        moved *= progress
        moved += base
        local = moved.astype(np.float32, copy=False)
        if self.kind == "delta":
            np.subtract(local, base, out=local)
        return local

    def hello(self) -> Hello:
        return Hello(device_id=self.device_id, board="sim", cores=1.0, ram_mb=self.ram_mb,
                     runtime_version="sim", profiles=self.profiles, n_samples=self.n_samples,
                     label_histogram=())


class VirtualClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class VersionRecord:
    version: int
    round: int
    t: float
    n_updates: int
    device_ids: tuple[str, ...]
    staleness: tuple[int, ...]
    metric: float | None  # metric(global) right after this version, if a metric was given


@dataclass
class SimResult:
    engine: Engine
    clock: VirtualClock
    versions: list[VersionRecord]
    logs: list[Mapping[str, Any]]
    evaluations: list[tuple[int, float]]  # (version, t) of each Evaluate action
    finish_reason: str | None
    n_events: int

    @property
    def global_flat(self) -> FloatArray:
        return self.engine.global_flat


# ---------------------------------------------------------------- the loop
def _update_for(dev: SimDevice, task_id: str, base_version: int) -> Update:
    return Update(task_id=task_id, device_id=dev.device_id, base_version=base_version, n_samples=dev.n_samples,
                  train_s=dev.duration_s, peak_rss_mb=0.0, energy_j=None, kind=dev.kind)


@dataclass(frozen=True)
class _Deferred:
    """A task's training, run when its update is delivered. `base` is the global model it was
    sent (the engine never writes a published model in place, so the reference stays valid)."""

    dev: SimDevice
    base: FloatArray
    indices: IndexArray | None

    def run(self) -> FloatArray:
        return self.dev.train(self.base if self.indices is None else self.base[self.indices], self.indices)


def _trained(dev: SimDevice, base: FloatArray, indices: IndexArray | None) -> Any:
    if getattr(dev, "train_at_delivery", False):
        return _Deferred(dev, base, indices)
    return dev.train(base if indices is None else base[indices], indices)


_HELLO, _OFFLINE, _UPDATE, _TICK = range(4)


def simulate(
    strategy: Strategy,
    devices: Sequence[SimDevice],
    *,
    initial_global: FloatArray | None = None,
    until_version: int | None = None,
    until_time: float | None = None,
    model: ModelOps | None = None,
    assign: AssignPolicy | None = None,
    config: EngineConfig | None = None,
    engine: Engine | None = None,
    clock: VirtualClock | None = None,
    metric: Callable[[FloatArray], float] | None = None,
    checkpoint_dir: str | Path | None = None,
    keep_logs: bool = True,
    max_events: int = 10_000_000,
) -> SimResult:
    """Run `devices` against a new engine (or a resumed `engine` with its `clock`) until the
    engine publishes `until_version`, the virtual clock passes `until_time`, the engine
    finishes, or nothing is left to happen. Checkpoints after every version if asked."""
    if until_version is None and until_time is None and (config is None or config.target_version is None):
        raise ConfigError("simulate needs until_version, until_time or config.target_version")
    if engine is None:
        if initial_global is None:
            raise ConfigError("simulate needs initial_global (or a resumed engine)")
        clock = clock or VirtualClock()
        model = model or DenseModel(int(np.asarray(initial_global).size))
        engine = Engine(strategy, model, initial_global, clock=clock, config=config, assign=assign)
    elif clock is None:
        raise ConfigError("a resumed engine needs the VirtualClock it was built with")
    assert clock is not None
    by_id = {d.device_id: d for d in devices}
    if len(by_id) != len(devices):
        raise ConfigError("simulated device ids must be unique")

    heap: list[tuple[float, int, int, Any]] = []
    seq = itertools.count()
    # Bumped when a device drops, voiding its in-flight work; only devices that dropped have one.
    incarnation: dict[str, int] = {}
    ticks: set[float] = set()
    result = SimResult(engine, clock, [], [], [], None, 0)

    def push(t: float, kind: int, payload: Any) -> None:
        heapq.heappush(heap, (t, next(seq), kind, payload))

    def schedule_change(dev: SimDevice, t: float) -> None:
        nxt = dev.availability.next_change(t)
        if nxt is not None and (until_time is None or nxt <= until_time):
            push(nxt, _OFFLINE if dev.availability.online_at(t) else _HELLO, dev.device_id)

    start = clock.now
    for dev in devices:
        if dev.availability.online_at(start):
            push(start, _HELLO, dev.device_id)
        schedule_change(dev, start)
    push(start, _TICK, None)
    # A resumed engine may have tasks out: their devices kept training through the server's
    # downtime, as real boards would, and deliver when their time is up.
    for task in list(engine.outstanding.values()):
        base_model = engine.model_at(task.base_version)
        if task.device_id in by_id and base_model is not None:
            dev = by_id[task.device_id]
            push(max(start, task.dispatched_s + dev.duration_s), _UPDATE,
                 (dev.device_id, 0, _update_for(dev, task.task_id, task.base_version),
                  _trained(dev, base_model, task.indices)))

    def run_actions(actions: list[Any], now: float) -> bool:
        for action in actions:
            if isinstance(action, SendTask):
                dev = by_id[action.device_id]
                assert engine is not None and action.base_version == engine.version
                upd = _update_for(dev, action.task_id, action.base_version)
                push(now + dev.duration_s, _UPDATE, (dev.device_id, incarnation.get(dev.device_id, 0), upd,
                                                     _trained(dev, engine.global_flat, action.indices)))
            elif isinstance(action, NewGlobal):
                assert engine is not None
                value = metric(engine.global_flat) if metric is not None else None
                result.versions.append(VersionRecord(action.version, action.round, action.t, action.n_updates,
                                                     action.device_ids, action.staleness, value))
                if checkpoint_dir is not None:
                    checkpoint.save(checkpoint_dir, engine)
            elif isinstance(action, Evaluate):
                result.evaluations.append((action.version, now))
            elif isinstance(action, Log):
                if keep_logs:
                    result.logs.append(action.event)
            elif isinstance(action, Finish):
                result.finish_reason = action.reason
                return True
        return False

    while heap and result.n_events < max_events:
        t, _, kind, payload = heapq.heappop(heap)
        if until_time is not None and t > until_time:
            break
        clock.now = t
        events: list[Event] = []
        if kind == _HELLO:
            dev = by_id[payload]
            events = [DeviceHello(dev.device_id, dev.hello())]
            schedule_change(dev, t)
            if t not in ticks:  # hellos only register; the tick hands out tasks
                ticks.add(t)
                push(t, _TICK, None)
        elif kind == _OFFLINE:
            incarnation[payload] = incarnation.get(payload, 0) + 1
            events = [DeviceOffline(payload, "availability schedule")]
            schedule_change(by_id[payload], t)
        elif kind == _UPDATE:
            device_id, inc, upd, values = payload
            if inc != incarnation.get(device_id, 0):
                continue  # the device went offline while training; the work is lost
            if isinstance(values, _Deferred):
                values = values.run()
            elif isinstance(values, Future):  # a device that trains for real, in a pool (testbed.simulate)
                values = values.result()
            event = UpdateReceived(device_id, upd, values)
            events = [event, event] if by_id[device_id].redeliver else [event]
        else:
            ticks.discard(t)
            events = [Tick(t)]
        stop = False
        for ev in events:
            result.n_events += 1
            stop = run_actions(engine.handle(ev), t) or stop
        if stop or (until_version is not None and engine.version >= until_version):
            break
        deadline = engine.next_deadline()
        if deadline is not None and deadline not in ticks and (until_time is None or deadline <= until_time):
            ticks.add(deadline)
            push(deadline, _TICK, None)
    if until_time is not None and not heap:
        clock.now = max(clock.now, until_time)
    return result
