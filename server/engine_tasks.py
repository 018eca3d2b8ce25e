"""The round engine's device and task book-keeping: who is online and idle, which tasks are out,
how a task is handed out, answered, abandoned or expired. A base class of `Engine`
(`server/engine.py`), split off along that seam; it owns no state of its own, the engine's
constructor sets every attribute declared here."""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

import numpy as np

from runtime.errors import ConfigError, RoundError
from runtime.protocol import Assignment
from server import aggregate as agg
from server.aggregate import IndexArray
from server.closing import RoundView
from server.events import Action, EventName, Log, SendTask
from server.methods import ServerMethod
from server.policies import AssignPolicy, ModelOps, Strategy
from server.records import AcceptedUpdate, DeviceRecord, EngineConfig, IdleQueue, TaskRecord, TaskTimeMedian


class TaskBook:
    strategy: Strategy
    model: ModelOps
    method: ServerMethod
    config: EngineConfig
    assign: AssignPolicy
    version: int
    round: int
    _devices: dict[str, DeviceRecord]
    _online: set[str]
    _idle: IdleQueue
    _done: set[str]
    _tasks: dict[str, TaskRecord]
    _pending: list[AcceptedUpdate]
    _closed: OrderedDict[tuple[str, str], str]
    _task_time: TaskTimeMedian
    _task_seq: int
    _round_started_s: float
    _started: bool
    _assign_cache: dict[tuple[str, int], tuple[Assignment, IndexArray | None]]
    _sampler: np.random.Generator | None

    def _view(self, now: float) -> RoundView:
        return RoundView(now_s=now, round_started_s=self._round_started_s, n_pending=len(self._pending),
                         n_outstanding=len(self._tasks), n_active=len(self._online),
                         median_task_s=self._task_time.median())

    def _dispatch(self, now: float, out: list[Action]) -> None:
        if not self._started:
            if len(self._online) < max(1, self.config.min_devices):
                return
            self._started = True
        in_progress = bool(self._tasks or self._pending)
        if (self.strategy.close.dispatch == "round" and in_progress) or not self._idle:
            return
        slots = len(self._idle)
        if self.strategy.concurrency is not None:
            slots = min(slots, self.strategy.concurrency - len(self._tasks))
        if slots <= 0:
            return
        if not in_progress:
            self._round_started_s = now  # an idle spell does not count against the deadline
        deadline_s: float | None = None
        if self.strategy.close.abandon_at_close:
            at = self.strategy.close.deadline_at(self._view(now))
            deadline_s = None if at is None else max(0.0, at - now)
        # Least recently served first, so a concurrency limit rotates through the fleet.
        if self._sampler is not None:
            pool = sorted(self._idle)
            chosen = [pool[int(i)] for i in self._sampler.choice(len(pool), size=min(slots, len(pool)), replace=False)]
        else:
            chosen = self._idle.least_recent(slots)
        for device_id in chosen:
            self._send(self._devices[device_id], now, deadline_s, out)

    def unassignable(self, profile: str) -> str | None:
        """Why `profile` cannot be sent under this strategy, or None if it can."""
        try:
            _, indices = self.assignment_for(profile, self.round)
        except ConfigError as exc:
            return str(exc)
        if indices is not None and not self.strategy.merge.accepts_submodels:
            return f"strategy {self.strategy.name!r} merges full models only; {profile!r} is a submodel"
        return None

    def _send(self, dev: DeviceRecord, now: float, deadline_s: float | None, out: list[Action]) -> None:
        if dev.profile_override is not None and (why := self.unassignable(dev.profile_override)) is not None:
            # A per-device choice (from its hello, or restored from a checkpoint) that no longer
            # fits: drop it with a reason rather than stop the server.
            out.append(self._log(now, EventName.DOWNGRADE_REFUSED, device=dev.device_id,
                                 **{"from": dev.profile_override, "to": None}, reason=why))
            dev.profile_override = None
        profile = dev.profile_override or self.assign.profile_for(dev.device_id, dev.hello, self.round)
        assignment, indices = self.assignment_for(profile, self.round)
        if indices is not None and not self.strategy.merge.accepts_submodels:
            raise ConfigError(f"strategy {self.strategy.name!r} merges full models only, but device "
                              f"{dev.device_id!r} was assigned submodel profile {profile!r}")
        self._task_seq += 1
        task = TaskRecord(f"t{self._task_seq}", dev.device_id, self.round, self.version, profile, now, indices,
                          assignment)
        self._tasks[task.task_id] = task
        dev.task_id, dev.last_dispatch_s = task.task_id, now
        self._set(dev, state="busy")
        out.append(SendTask(dev.device_id, task.task_id, task.round, task.base_version, assignment, indices,
                            deadline_s))
        out.append(self._log(now, EventName.TASK_SENT, device=dev.device_id, task_id=task.task_id,
                             base_version=task.base_version, profile=profile))

    def assignment_for(self, profile: str, round_index: int) -> tuple[Assignment, IndexArray | None]:
        """The method's assignment for `profile` in `round_index` and its checked global indices."""
        key = (profile, round_index)
        if key not in self._assign_cache:
            if len(self._assign_cache) > 64:  # profiles × a few rounds; FedRolex changes per round
                self._assign_cache.clear()
            assignment, raw = self.method.for_profile(profile).assign(profile, round_index)
            try:
                idx = None if raw is None else agg.check_indices(raw, self.model.n_params, f"profile {profile!r}")
            except RoundError as exc:
                raise ConfigError(str(exc)) from None
            if idx is not None:
                idx.flags.writeable = False
            self._assign_cache[key] = (assignment, idx)
        return self._assign_cache[key]

    def _resolve(self, task: TaskRecord, closed_reason: str, state: str) -> None:
        del self._tasks[task.task_id]
        # Interned: up to remember_tasks entries, most of them sharing a few reasons per round.
        self._closed[(task.device_id, task.task_id)] = sys.intern(closed_reason)
        while len(self._closed) > self.config.remember_tasks:
            self._closed.popitem(last=False)
        dev = self._devices[task.device_id]
        dev.task_id = None
        self._set(dev, state=state)

    def _abandon(self, task: TaskRecord, now: float, reason: str, out: list[Action], *, slow: bool = False) -> None:
        """`slow`: dropped for taking too long, so its elapsed time is a lower bound on its task time."""
        self._resolve(task, f"was abandoned ({reason})", "idle")
        dev = self._devices[task.device_id]
        dev.n_abandoned += 1
        if slow:
            self._set_task_time(dev, max(dev.task_s or 0.0, now - task.dispatched_s))
        out.append(self._log(now, EventName.TASK_ABANDONED, device=task.device_id, task_id=task.task_id,
                             base_version=task.base_version, reason=reason))

    def _expire_tasks(self, now: float, out: list[Action]) -> None:
        timeout = self.config.task_timeout_s
        if timeout is None:
            return
        for task in list(self._tasks.values()):  # dispatch order: stop at the first young task
            if now - task.dispatched_s < timeout:
                break
            self._abandon(task, now, f"no update within task_timeout_s={timeout:g}", out, slow=True)

    def _set_task_time(self, dev: DeviceRecord, task_s: float) -> None:
        if dev.online:
            self._task_time.remove(dev.task_s)
            self._task_time.add(task_s)
        dev.task_s = task_s

    def _set(self, dev: DeviceRecord, *, online: bool | None = None, state: str | None = None) -> None:
        if online is not None and online != dev.online:
            (self._task_time.add if online else self._task_time.remove)(dev.task_s)
            dev.online = online
        if state is not None:
            dev.state = state
        if dev.online:
            self._online.add(dev.device_id)
        else:
            self._online.discard(dev.device_id)
        if dev.online and dev.state == "idle":
            self._idle.add(dev.device_id, dev.last_dispatch_s)
        else:
            self._idle.discard(dev.device_id)
        if dev.state == "done":
            self._done.add(dev.device_id)
        else:
            self._done.discard(dev.device_id)

    def _log(self, now: float, event: str, **fields: Any) -> Log:
        return Log({"event": event, "t": now, "round": self.round, "version": self.version, **fields})
