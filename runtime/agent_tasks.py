"""The device agent's task lifecycle: a task's artifacts, its start on the trainer child, the
trainer's result packed into a sealed update, the outbox until the server's receipt, and the tier
measurements each task leaves. A base class of `Agent` (runtime/agent.py), split off along that
seam; it owns no state of its own: the agent's constructor sets every attribute declared here
but the services a task needs (trainer child, sampler, outbox), which `_start_services` sets
once the first hello is out, and the agent provides the four methods declared abstract
(status, sealing, tier choice, hello).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING

from runtime import startup
from runtime.board import BoardConfig
from runtime.device_config import DeviceConfig
from runtime.errors import OrchardError, ProtocolError, TransportError
from runtime.methods import check_name
from runtime.mqtt import MqttClient
from runtime.protocol import Artifact, Receipt, SparseTensor, Task, Update, validate_tensors
from runtime.record import record
from runtime.tiering import Measured, TierCache

if TYPE_CHECKING:  # imported by _start_services, after the hello (runtime/agent.py's doc)
    from runtime.manifest import StagedArtifacts
    from runtime.outbox import Outbox
    from runtime.protocol import Topics
    from runtime.telemetry import CgroupLimits, FreezeWatch, Sampler
    from runtime.trainer_proc import TrainerProcess

log = logging.getLogger("orchard.device")

DONE_TASKS = 1024  # task ids remembered, so a replayed task is not trained twice
MANIFEST = "manifest.json"  # runtime.manifest.MANIFEST (a test checks); that module imports numpy


@record(frozen=False)
class _Running:
    task: Task
    energy_j_at_start: float
    started_s: float


class TaskLifecycle(ABC):
    cfg: DeviceConfig
    id: str
    board: BoardConfig
    topics: Topics
    mqtt: MqttClient
    # Set by _start_services, after the first hello; `services_up` says whether they are yet.
    services_up: bool
    threads: int
    freeze: FreezeWatch
    trainer: TrainerProcess
    sampler: Sampler
    outbox: Outbox
    stop_event: threading.Event
    running: _Running | None
    queued: Task | None
    waiting_for_artifact: Task | None
    done_tasks: dict[str, None]
    _received_at: dict[str, float]
    upload_s: float
    greeted: bool
    tiers: TierCache | None
    tier: str
    tier_reason: str
    tier_steps: int
    tier_deadline_s: float | None

    @property
    @abstractmethod
    def staged(self) -> StagedArtifacts: ...

    @abstractmethod
    def _set_state(self, state: str, task_id: str | None = None, detail: str = "",
                   failure: str | None = None) -> None: ...

    @abstractmethod
    def _choose_tier(self) -> tuple[str, str]: ...

    @abstractmethod
    def _announce(self) -> None: ...

    @abstractmethod
    def _update_chunks(self, frame: bytes, msg_id: str, chunk_bytes: int) -> Iterator[bytes]: ...

    def _start_services(self) -> None:
        """What the hello does not need (runtime/agent.py's doc), once: the trainer child (launched, not
        waited for), the telemetry sampler and its freeze watch, the outbox."""
        if self.services_up:
            return
        from runtime.outbox import Outbox
        from runtime.telemetry import FreezeWatch, Sampler, threads_for_quota
        from runtime.trainer_proc import TrainerProcess

        limits = cgroup_limits()
        quota = limits.cpu_quota_cores()
        cores = quota if quota is not None else min(float(self.board.cores), float(os.cpu_count() or 1))
        self.threads = self.cfg.threads or threads_for_quota(cores, self.board.cores)
        self.freeze = FreezeWatch.for_poll(self.cfg.poll_s)
        self.trainer = TrainerProcess(self.cfg.shard, threads=self.threads,
                                      start_timeout_s=self.cfg.trainer_start_timeout_s,
                                      providers=self.board.runtime.execution_providers, start=False)
        self.sampler = Sampler(lambda: self.trainer.pid, self.board, self.cfg.sysfs_root, limits,
                               offline=self.cfg.offline, freeze=self.freeze)
        # Update frames by task id, from the end of training until the server's receipt; sealed
        # as they are chunked (runtime/outbox.py).
        self.outbox = Outbox(lambda chunk: self.mqtt.publish(self.topics.update(self.id), chunk, qos=1),
                             chunks=self._update_chunks)
        self.services_up = True
        self.trainer.launch()

    def _remember(self, task_id: str) -> None:
        self.done_tasks[task_id] = None
        while len(self.done_tasks) > DONE_TASKS:
            del self.done_tasks[next(iter(self.done_tasks))]

    def _on_receipt(self, receipt: Receipt) -> None:
        if receipt.device_id != self.id:
            raise ProtocolError(f"receipt for {receipt.device_id!r} on {self.id}'s topic")
        if not self.outbox.settle(receipt):
            return  # a second receipt for a re-sent copy
        if receipt.accepted:
            log.info("%s: update %s accepted", self.id, receipt.task_id)
        else:
            log.warning("%s: update %s refused: %s", self.id, receipt.task_id, receipt.reason)

    def _on_artifact(self, artifact: Artifact) -> None:
        # Authenticated already; it still has to be one a task asked for, with the manifest hash
        # that task gave. The server pushes artifacts just before the task naming them, so a
        # few wait here for it.
        for dropped in self.staged.hold(artifact.key, artifact.files):
            log.warning("%s: dropped artifact %s: no task named it", self.id, dropped)
        pending = self.waiting_for_artifact
        if pending is not None and artifact.key in pending.assignment.artifact_keys:
            self.waiting_for_artifact = None
            self._on_task(pending)

    def _missing_artifacts(self, task: Task) -> list[str]:
        keys = task.assignment.artifact_keys
        return [k for k in keys if not (self.cfg.artifact_cache / k / MANIFEST).is_file()]

    def _on_task(self, task: Task) -> None:
        if self.running is not None:
            # Refusing it silently would leave the server waiting for it until task_timeout_s
            # (forever without one). Newest wins: an older queued task was given up on as well.
            log.warning("%s: task %s queued: still training %s", self.id, task.task_id, self.running.task.task_id)
            self.queued = task
            return
        if not self.trainer.up:  # starting (or restarting); _poll_trainer polls it and raises its failures
            if not self.trainer.launched:
                self.trainer.launch()
            log.info("%s: task %s waits for the trainer to start", self.id, task.task_id)
            self.queued = task
            return
        from runtime.manifest import read_manifest  # numpy, from the first task on
        from runtime.trainer_proc import TrainerDied, TrainJob, failure_of_exit

        try:
            for key in self.staged.install(task.assignment.artifact_keys, task.artifact_digests,
                                           f"task {task.task_id}"):
                log.info("%s: stored artifact %s", self.id, key)
        except OrchardError as exc:
            self._set_state("failed", task.task_id, f"task {task.task_id}: {exc}", failure="error")
            self._set_state("idle")
            return
        missing = self._missing_artifacts(task)
        if missing:
            log.info("%s: task %s waits for artifacts %s", self.id, task.task_id, ", ".join(missing))
            self.waiting_for_artifact = task
            return
        try:
            check_name(task.assignment.method)
            layout = read_manifest(self.cfg.artifact_cache / task.assignment.primary_key).layout
            validate_tensors(task.tensors, {p.name: p.shape for p in layout}, source="server")
            dense = {name: t for name, t in task.tensors.items() if not isinstance(t, SparseTensor)}
            if len(dense) != len(task.tensors):  # the server always sends whole submodels
                raise ProtocolError(f"task {task.task_id} carries sparse tensors; tasks must be dense")
            weights = layout.join(dense)
        except OrchardError as exc:
            self._set_state("failed", task.task_id, f"task {task.task_id} unusable: {exc}", failure="error")
            self._set_state("idle")
            return
        seed = zlib.crc32(f"{self.id}/{task.task_id}".encode())
        received = self._received_at.pop(task.task_id, time.monotonic())
        deadline_at = received + task.deadline_s - self.upload_s if task.deadline_s else None  # 0: none
        job = TrainJob(job_id=task.task_id, artifact_root=str(self.cfg.artifact_cache), assignment=task.assignment,
                       upload=task.upload, steps=task.local_steps, epochs=task.local_epochs,
                       batch_size=task.batch_size, lr=task.lr, seed=seed, deadline_at=deadline_at)
        # Meter readings at each end of the task, so its energy is the integral over the task
        # itself, not over the nearest 1 Hz rows (a sub-second task would otherwise report 0 J).
        # They move the energy integral only: rows keep their fixed rate and whole intervals.
        energy_j = self.sampler.mark()
        try:
            self.trainer.submit(job, weights)
        except TrainerDied as exc:
            log.error("%s: %s", self.id, exc)
            self._set_state("failed", task.task_id, str(exc), failure=failure_of_exit(exc.exitcode))
            if not self.stop_event.is_set():
                self.trainer.restart()
            self._set_state("idle")
            return
        self.running = _Running(task, energy_j, time.monotonic())
        self._set_state("training", task.task_id)

    # ------------------------------------------------------------ training results
    def _poll_trainer(self) -> None:
        if self.stop_event.is_set():
            return  # shutting down: a trainer that stopped meanwhile is no failure
        from runtime.trainer_proc import TrainerDied, failure_of_exit
        run = self.running
        if run is None:
            # A child that died while starting ends the agent (as one that cannot load its shard
            # always did): restarting it in a loop would hide the cause.
            if self.trainer.launched and not self.trainer.up:
                if not self.trainer.ready:
                    return
                startup.mark("trainer_ready")
                log.info("%s: trainer %s ready; %s", self.id, self.trainer.pid, startup.line())
            if self.queued is not None and self.trainer.up:
                task, self.queued = self.queued, None
                self._on_task(task)
            return
        try:
            outcome = self.trainer.poll()
        except TrainerDied as exc:
            self.running = None
            log.error("%s: %s", self.id, exc)
            self._set_state("failed", run.task.task_id, str(exc), failure=failure_of_exit(exc.exitcode))
            self.trainer.restart()
            self._set_state("idle")
            return
        if outcome is None:
            return
        self.running = None
        if outcome.body is None:
            self._set_state("failed", run.task.task_id, outcome.error or "training failed",
                            failure=outcome.failure or "error")
            self._set_state("idle")
            return
        from runtime.frames import encode_update
        from runtime.manifest import read_manifest

        task = run.task
        packing_from = time.monotonic()
        energy_j = self.sampler.mark()
        # The quota the task ran under, to check it was delivered: cpu_s / (train_s x quota).
        cores = self.sampler.limits.cpu_quota_cores()
        quota = {} if cores is None else {"cpu_quota_cores": cores}
        layout = read_manifest(self.cfg.artifact_cache / task.assignment.primary_key, verify=False).layout
        update = Update(
            task_id=task.task_id, device_id=self.id, base_version=task.base_version, n_samples=outcome.n_samples,
            train_s=outcome.train_s, peak_rss_mb=outcome.peak_rss_mb,
            energy_j=energy_j - run.energy_j_at_start, kind=outcome.body.form,
            metrics={"loss_first": outcome.loss_first, "loss_last": outcome.loss_last,
                     "step_ms_median": outcome.step_ms_median, "task_wall_s": time.monotonic() - run.started_s,
                     "cpu_s": outcome.cpu_s, "steps": outcome.steps, **quota},
            tensors=outcome.body.tensors(layout), report=outcome.body.report,
        )
        self._measure_tier(task, outcome.peak_rss_mb, outcome.step_ms_median, cores)
        frame = encode_update(update, encoding=task.encoding)  # the outbox seals it as it chunks it
        self._set_state("uploading", task.task_id)
        self.outbox.add(task.task_id, frame)
        if self._reachable():
            self._send_update(task.task_id)
        else:
            # Published now it would reach no server: a crashed one (its Last Will said offline)
            # is not subscribed, and after a reconnect we wait for its state. A resumed server
            # still holds the task from its checkpoint, so the update counts when it gets there.
            log.warning("%s: server not reachable; update for %s waits in the outbox", self.id, task.task_id)
        self.upload_s = time.monotonic() - packing_from
        self._set_state("idle")

    def _measure_tier(self, task: Task, peak_rss_mb: float, step_ms: float, cores: float | None) -> None:
        """Record what this task's profile cost; re-announce when that changes the choice."""
        if self.tiers is None:
            return
        self.tier_steps = task.local_steps or self.tier_steps
        self.tier_deadline_s = task.deadline_s if task.deadline_s > 0 else None
        self.tiers.record(task.assignment.profile, Measured(peak_rss_mb, step_ms, cores or float(self.board.cores)))
        tier, self.tier_reason = self._choose_tier()
        if tier != self.tier:
            log.info("%s: tier %s -> %s: %s", self.id, self.tier, tier, self.tier_reason)
            self.tier = tier
            self.trainer.restart()  # a fresh child: its peak RSS is the new tier's, not the old one's
            if self.mqtt.is_connected and self.greeted:
                self._announce()  # the hello again, with the new choice first

    def _reachable(self) -> bool:
        return self.mqtt.is_connected and self.greeted

    def _send_update(self, task_id: str) -> None:
        try:
            self.outbox.send(task_id)
        except TransportError as exc:  # refused outright (queue full): the backoff tries again
            log.warning("%s: update %s not sent: %s", self.id, task_id, exc)

    def _flush_outbox(self) -> None:
        # Called once the server is back: everything without a receipt goes again. "Still
        # useful" is its call: it knows the staleness bound and refuses stale updates with a reason.
        for task_id in self.outbox.task_ids():
            log.info("%s: sending update %s again (no receipt yet)", self.id, task_id)
            self._send_update(task_id)


def cgroup_limits() -> CgroupLimits:
    from runtime.telemetry import CgroupLimits  # psutil and the power models: after the hello

    return CgroupLimits()
