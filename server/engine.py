"""The round engine: a pure state machine with an injected clock.

`Engine.handle(event) -> [action]` is the whole interface (events and actions: `server/events.py`).
It tracks devices (online; idle / busy / done-for-this-round), outstanding tasks, the global
model and its recent versions, and pending updates; a `Strategy` (`server/policies.py`) says
when a round closes, how updates weigh and merge. No I/O, no threads: the MQTT adapter and the
in-memory transport drive it the same way, so everything here is testable on a virtual clock.

Invariants:
- the global buffer is only replaced by a fully validated new array, never written in place;
- an update counts once: it must answer an outstanding task (device, task id), which it then
  closes, so a redelivered QoS-1 message is refused as a duplicate;
- staleness = current version − the task's base version; above `max_staleness` it is refused;
  an update older than `max_age_factor` × the slowest online device's task time is refused too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from runtime.errors import ConfigError, RoundError
from runtime.protocol import Assignment, Status
from server import aggregate as agg
from server import weighting
from server.aggregate import FloatArray, IndexArray, UpdateContribution
from server.engine_tasks import TaskBook
from server.events import (
    Action,
    DeviceHello,
    DeviceOffline,
    DeviceStatus,
    Evaluate,
    Event,
    EventName,
    Finish,
    NewGlobal,
    Tick,
    UpdateReceived,
)
from server.methods import ServerMethod, server_method
from server.policies import AssignPolicy, FixedProfile, ModelOps, Strategy, WeightInput
from server.records import AcceptedUpdate, DeviceRecord, EngineConfig, IdleQueue, TaskRecord, TaskTimeMedian
from server.robust import robust_merge

__all__ = ["AcceptedUpdate", "DeviceRecord", "Engine", "EngineConfig", "TaskRecord"]

def _frozen(arr: FloatArray) -> FloatArray:
    arr.flags.writeable = False  # a stray in-place write raises instead of corrupting the model
    return arr


class Engine(TaskBook):
    def __init__(
        self,
        strategy: Strategy,
        model: ModelOps,
        initial_global: FloatArray,
        *,
        clock: Callable[[], float],
        config: EngineConfig | None = None,
        assign: AssignPolicy | None = None,
        method: ServerMethod | None = None,
    ) -> None:
        self.strategy = strategy
        self.model = model
        self.method = method or server_method(None, None, model)
        self.weight = self.method.weight_policy(strategy.weight)
        self.config = config or EngineConfig()
        self.assign: AssignPolicy = assign or FixedProfile()
        self._clock = clock
        try:
            g = agg.check_global(np.array(initial_global, dtype=np.float32), "initial global model")
        except RoundError as exc:
            raise ConfigError(str(exc)) from None
        if g.size != model.n_params:
            raise ConfigError(f"initial global model has {g.size} values, the model has {model.n_params}")
        self._global = _frozen(g)
        self.version = 0
        self.round = 0
        self.finished = False
        self._history: dict[int, FloatArray] = {0: self._global}
        self._devices: dict[str, DeviceRecord] = {}
        self._online: set[str] = set()
        self._idle = IdleQueue()  # online and idle: who can take a task now
        self._done: set[str] = set()  # state "done": their update is in this round
        self._tasks: dict[str, TaskRecord] = {}  # insertion order = dispatch order
        self._pending: list[AcceptedUpdate] = []
        self._closed: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._task_time = TaskTimeMedian()  # over online devices
        self._task_seq = 0
        self._start_s = clock()
        self._round_started_s = self._start_s
        self._started = False
        self._assign_cache: dict[tuple[str, int], tuple[Assignment, IndexArray | None]] = {}
        seed = self.config.sample_seed
        self._sampler = np.random.default_rng(seed) if seed is not None else None
        self.method.on_global(self.version, self._global)

    # ------------------------------------------------------------ read-only views
    @property
    def global_flat(self) -> FloatArray:
        """The current global model (read-only array)."""
        return self._global

    @property
    def devices(self) -> Mapping[str, DeviceRecord]:
        return MappingProxyType(self._devices)

    @property
    def outstanding(self) -> Mapping[str, TaskRecord]:
        return MappingProxyType(self._tasks)

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    def model_at(self, version: int) -> FloatArray | None:
        """Global model `version` if still retained (current, or the base of an outstanding task)."""
        return self._history.get(version)

    def next_deadline(self) -> float | None:
        """The next clock time at which a Tick may change something, if any."""
        now = self._clock()
        times = [self.strategy.close.deadline_at(self._view(now))]
        if self.config.task_timeout_s is not None and self._tasks:
            first = next(iter(self._tasks.values()))
            times.append(first.dispatched_s + self.config.task_timeout_s)
        if self.config.time_limit_s is not None:
            times.append(self._start_s + self.config.time_limit_s)
        future = [t for t in times if t is not None and t > now]
        return min(future) if future else None

    # ------------------------------------------------------------ events
    def handle(self, event: Event) -> list[Action]:
        """Apply one event; return what to do. A hello only registers the device: tasks go out
        on the next other event or Tick, so a fleet that connects together starts together."""
        if self.finished:
            return []
        now = event.now if isinstance(event, Tick) and event.now is not None else self._clock()
        out: list[Action] = []
        if isinstance(event, DeviceHello):
            self._on_hello(event, now, out)
            return out
        if isinstance(event, DeviceStatus):
            self._on_status(event, now, out)
        elif isinstance(event, DeviceOffline):
            self._on_offline(event.device_id, event.reason, now, out)
        elif isinstance(event, UpdateReceived):
            self._on_update(event, now, out)
        elif isinstance(event, Tick):
            self._expire_tasks(now, out)
        self._progress(now, out)
        return out

    def _on_hello(self, event: DeviceHello, now: float, out: list[Action]) -> None:
        dev = self._devices.get(event.device_id)
        if dev is None and len(self._devices) >= self.config.max_devices:
            # Made-up ids must not grow the engine's (and its checkpoint's) state without bound.
            out.append(self._log(now, EventName.HELLO_REJECTED, device=event.device_id,
                                 reason=f"already {len(self._devices)} devices, max_devices={self.config.max_devices}"))
            return
        if dev is None:
            dev = self._devices[event.device_id] = DeviceRecord(event.device_id, event.hello, online=False)
        else:
            # A known device reconnecting keeps its task: its trainer may still be running.
            dev.hello = event.hello
            if dev.profile_override is not None and dev.profile_override not in event.hello.profiles:
                dev.profile_override = None  # it no longer offers the fallback: back to the policy's choice
        if not dev.online and dev.task_id is None:
            dev.state = "idle"
        self._set(dev, online=True)
        self.method.on_hello(event.device_id, event.hello)
        out.append(self._log(now, EventName.DEVICE_HELLO, device=event.device_id, board=event.hello.board,
                             n_samples=event.hello.n_samples))

    def _on_status(self, event: DeviceStatus, now: float, out: list[Action]) -> None:
        status = event.status
        dev = self._devices.get(event.device_id)
        if dev is None:
            out.append(self._log(now, EventName.STATUS_REJECTED, device=event.device_id, state=status.state,
                                 reason=f"status {status.state!r} from unknown device {event.device_id!r}"))
            return
        if status.state == "offline":
            self._on_offline(event.device_id, "status offline", now, out)
            return
        self._set(dev, online=True)
        if status.state == "failed" and dev.task_id is not None:
            task = self._tasks[dev.task_id]
            if status.task_id in (None, task.task_id):
                self._abandon(task, now, f"device failed: {status.detail or 'no detail'}", out)
                self._after_failure(dev, task.profile, status, now, out)

    def _after_failure(self, dev: DeviceRecord, profile: str, status: Status, now: float, out: list[Action]) -> None:
        """Let the assign policy move a device off a profile it cannot train (e.g. out of memory)."""
        new = self.assign.after_failure(dev.device_id, dev.hello, profile, status.failure)
        if new is None or new == profile:
            return
        why = self.unassignable(new)
        if why is not None:  # e.g. a submodel under a full-model merge: keep the profile, keep serving
            out.append(self._log(now, EventName.DOWNGRADE_REFUSED, device=dev.device_id, **{"from": profile, "to": new},
                                 failure=status.failure, reason=why))
            return
        dev.profile_override = new
        out.append(self._log(now, EventName.PROFILE_DOWNGRADED, device=dev.device_id, **{"from": profile, "to": new},
                             failure=status.failure, reason=status.detail))

    def _on_offline(self, device_id: str, reason: str, now: float, out: list[Action]) -> None:
        dev = self._devices.get(device_id)
        if dev is None:
            out.append(self._log(now, EventName.STATUS_REJECTED, device=device_id, state="offline",
                                 reason=f"offline notice for unknown device {device_id!r}"))
            return
        if dev.task_id is not None:
            self._abandon(self._tasks[dev.task_id], now, f"device offline ({reason})", out)
        self._set(dev, online=False, state="idle")
        out.append(self._log(now, EventName.DEVICE_OFFLINE, device=device_id, reason=reason))

    def _on_update(self, event: UpdateReceived, now: float, out: list[Action]) -> None:
        upd = event.update
        try:
            accepted = self.check_update(event)
        except RoundError as exc:
            task = self._tasks.get(upd.task_id)
            if task is not None and task.device_id == event.device_id:
                self._resolve(task, "already answered by a refused update", "idle")  # answered, if badly
                # Its speed is known now, refused or not: the age bound must learn that a device
                # slowed down, or it would refuse that device every time.
                self._set_task_time(self._devices[task.device_id], max(0.0, now - task.dispatched_s))
            if event.device_id in self._devices:
                self._devices[event.device_id].n_rejected += 1
            out.append(self._log(now, EventName.UPDATE_REJECTED, device=event.device_id, task_id=upd.task_id,
                                 base_version=upd.base_version, reason=str(exc), train_s=upd.train_s,
                                 energy_j=upd.energy_j))
            return
        task = accepted.task
        after = "idle" if self.strategy.close.dispatch == "continuous" else "done"
        self._resolve(task, f"already accepted in round {self.round} (duplicate delivery)", after)
        self._devices[task.device_id].n_accepted += 1
        self._set_task_time(self._devices[task.device_id], max(0.0, now - task.dispatched_s))
        self._pending.append(accepted)
        out.append(self._log(now, EventName.UPDATE_ACCEPTED, device=task.device_id, task_id=task.task_id,
                             task_round=task.round, base_version=task.base_version,
                             staleness=accepted.staleness, n_samples=accepted.n_samples, kind=upd.kind,
                             **({"n_samples_claimed": upd.n_samples} if upd.n_samples != accepted.n_samples else {}),
                             n_values=int(accepted.values.size), train_s=upd.train_s, energy_j=upd.energy_j,
                             metrics=dict(upd.metrics), **({"report": dict(upd.report)} if upd.report else {})))

    # ------------------------------------------------------------ update validation
    def check_update(self, event: UpdateReceived) -> AcceptedUpdate:
        """Validate an update against the round state without changing anything; RoundError
        names the device, the task and the offending value."""
        upd, device_id = event.update, event.device_id
        who = f"update from device {device_id!r} for task {upd.task_id!r}"
        if device_id not in self._devices:
            raise RoundError(f"{who}: unknown device")
        if upd.device_id != device_id:
            raise RoundError(f"{who}: the update names device {upd.device_id!r}")
        closed = self._closed.get((device_id, upd.task_id))
        if closed is not None:
            raise RoundError(f"{who}: task {closed}")
        task = self._tasks.get(upd.task_id)
        if task is None or task.device_id != device_id:
            raise RoundError(f"{who}: unknown task (not outstanding for this device)")
        if upd.base_version != task.base_version:
            raise RoundError(f"{who}: base version {upd.base_version}, the task was sent at {task.base_version}")
        staleness = self.version - task.base_version
        cap = self.strategy.max_staleness
        if cap is not None and staleness > cap:
            raise RoundError(f"{who}: too stale, base version {task.base_version} is {staleness} versions "
                             f"behind {self.version} (max_staleness {cap})")
        factor, slowest_s = self.strategy.max_age_factor, self._task_time.slowest()
        age_s = self._clock() - task.dispatched_s
        if factor is not None and slowest_s is not None and age_s > factor * slowest_s:
            raise RoundError(f"{who}: too old, {age_s:.3g} s since dispatch is more than {factor:g} x "
                             f"{slowest_s:.3g} s, the slowest online device's task time")
        base = self._history.get(task.base_version)
        if base is None:  # cannot happen while the cap holds; refuse rather than guess
            raise RoundError(f"{who}: base version {task.base_version} is no longer retained")
        payload = self.method.for_profile(task.profile).admit(event, task, base, self.strategy, who)
        # A device's sample count weighs its update: never more than it declared at hello (a
        # claim of 2^62 would otherwise take the whole merge).
        declared = self._devices[device_id].hello.n_samples
        n_samples = min(upd.n_samples, declared, self.config.shard_samples.get(device_id, declared))
        return AcceptedUpdate(task=task, staleness=staleness, n_samples=n_samples, indices=payload.indices,
                              values=payload.values, delta_l1=payload.delta_l1, rate=payload.rate,
                              coord_weights=payload.coord_weights)

    # ------------------------------------------------------------ rounds
    def _progress(self, now: float, out: list[Action]) -> None:
        limit = self.config.time_limit_s
        if limit is not None and now >= self._start_s + limit:
            self._finish(f"time limit {limit:g} s reached", now, out)
            return
        reason = self.strategy.close.should_close(self._view(now))
        if reason is not None:
            self._close(reason, now, out)
        if not self.finished:
            self._dispatch(now, out)

    def _close(self, reason: str, now: float, out: list[Action]) -> None:
        pending, self._pending = self._pending, []
        new: FloatArray | None = None
        robust: dict[str, Any] = {}
        try:
            new, robust = self._merge(pending)
        except RoundError as exc:
            out.append(self._log(now, EventName.AGGREGATION_FAILED, reason=str(exc),
                                 devices=[p.task.device_id for p in pending]))
        closed_round = self.round
        self.round += 1
        self._round_started_s = now
        if new is not None:
            self.version += 1
            self._global = _frozen(new)
            self._history[self.version] = self._global
            self.method.on_global(self.version, self._global)
            devices = tuple(p.task.device_id for p in pending)
            staleness = tuple(p.staleness for p in pending)
            out.append(self._log(now, EventName.AGGREGATED, closed_round=closed_round, reason=reason,
                                 devices=list(devices), staleness=list(staleness), **robust))
            out.append(NewGlobal(self.version, closed_round, now, len(pending), devices, staleness, reason))
        if self.strategy.close.abandon_at_close:
            for task in list(self._tasks.values()):
                self._abandon(task, now, f"straggler dropped when round {closed_round} closed", out, slow=True)
        for device_id in list(self._done):
            self._set(self._devices[device_id], state="idle")
        self._prune_history()
        if new is None:
            return
        target = self.config.target_version
        reached = target is not None and self.version >= target
        every = self.config.eval_every
        if (every and self.version % every == 0) or reached:
            out.append(Evaluate(self.version))
        if reached:
            self._finish(f"reached version {self.version}", now, out)

    def _merge(self, pending: list[AcceptedUpdate]) -> tuple[FloatArray, dict[str, Any]]:
        drift: dict[int, float] = {}

        def drift_of(base: int) -> float:
            if base not in drift:
                drift[base] = weighting.l1_drift(self._global, self._history[base])
            return drift[base]

        items = [WeightInput(p.n_samples, p.staleness, p.delta_l1, p.rate, p.task.base_version, drift_of)
                 for p in pending]
        gammas = self.weight.weights(items)
        contributions = [UpdateContribution(p.indices, p.values, g, p.coord_weights)
                         for p, g in zip(pending, gammas, strict=True)]
        cfg = self.strategy.robust
        robust: dict[str, Any] = {}
        if cfg.active:
            merged, report = robust_merge(self._global, contributions, self.strategy.merge, cfg)
            robust = report.fields(cfg, [p.task.device_id for p in pending])
        else:
            merged = self.strategy.merge.merge(self._global, contributions)
        new = agg.check_global(merged, "merged model")
        if new is self._global or new.size != self._global.size:
            raise RoundError(f"merge returned {new.size} values for a model of {self._global.size}")
        return new, robust

    def _prune_history(self) -> None:
        # Keep the current model and every base an outstanding task may still be measured
        # against (within the staleness cap): at most one copy per in-flight base version.
        cap = self.strategy.max_staleness
        keep = {self.version} | {
            t.base_version for t in self._tasks.values() if cap is None or self.version - t.base_version <= cap
        }
        for v in [v for v in self._history if v not in keep]:
            del self._history[v]

    def _finish(self, reason: str, now: float, out: list[Action]) -> None:
        self.finished = True
        out.append(self._log(now, EventName.FINISHED, reason=reason))
        out.append(Finish(reason, self.version))
