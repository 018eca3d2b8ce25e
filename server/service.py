"""The aggregator process: the round engine driven over MQTT (`orchard server`).

MQTT messages become engine events; engine actions become publishes, checkpoints and output
rows. Every frame is validated before it reaches the engine, and a bad one is logged with its
reason in events.jsonl and dropped: the global model never sees it.

Every message on `dev/<id>/*` is opened (runtime/seal.py) under that device's key before it is
decoded: a device with no key in the credentials file, a forgery, or a replay from another run
or device is refused with the reason. Each update gets a sealed receipt (accepted, or refused
and why); a re-sent copy of one already answered gets the same receipt again and is counted once.

Outputs in the run folder: events.jsonl (one JSON object per line), server.csv (one row per
aggregation), devices/<id>.csv (telemetry), checkpoint/ (global model + engine state).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.chunks import Reassembler
from runtime.credentials import load_credentials
from runtime.errors import ConfigError, OrchardError, ProtocolError
from runtime.frames import DEFAULT_LIMITS, decode_update
from runtime.layout import FloatArray, ParamLayout
from runtime.mqtt import Connected, Disconnected, Message, MqttClient, MqttConfig, Will
from runtime.protocol import (
    ID_PATTERN,
    Hello,
    Receipt,
    ServerState,
    SparseTensor,
    Status,
    Telemetry,
    Tensor,
    Topics,
    Update,
    decode_json,
    encode_json,
    validate_tensors,
)
from runtime.seal import Opened, open_sealed
from server import checkpoint
from server.aggregate import IndexArray
from server.config import ServerConfig
from server.engine import Engine
from server.events import (
    Action,
    DeviceHello,
    DeviceStatus,
    Evaluate,
    Event,
    EventName,
    Finish,
    Log,
    NewGlobal,
    SendTask,
    Tick,
    UpdateReceived,
)
from server.guard import HELLO_BURST, HELLO_MAX_BYTES, HELLO_PER_S, RejectLog, TokenBuckets
from server.methods import server_method
from server.model import ServerModel
from server.outbound import Outbound
from server.outputs import BoardClock, Outputs, first_start
from server.policies import AssignPolicy, DowngradeOnOom, ProfileByDevice
from server.scoring import Scorer
from server.strategies import get_strategy

log = logging.getLogger("orchard.server")

TICK_S = 0.2
RECEIPTS_KEPT = 100_000  # answered (device, task id) pairs, to answer a re-sent copy the same way
DEVICE_KINDS = ("hello", "status", "telemetry", "update")  # what devices publish; the rest is ours
def update_body(layout: ParamLayout, tensors: Mapping[str, Tensor]) -> tuple[IndexArray | None, FloatArray]:
    """The coordinates (in `layout`'s flat buffer) and values of a validated update.

    Dense tensors bring all their coordinates; a sparse one (a top-k or masked upload) only the
    ones it sent, so the merge counts exactly those (methods.md §5.3: a coordinate nobody sent
    keeps the global value, or under a delta merge moves by zero). None: every coordinate."""
    if not any(isinstance(tensors[p.name], SparseTensor) for p in layout):
        return None, layout.join({p.name: np.asarray(tensors[p.name]) for p in layout})
    index_parts: list[IndexArray] = []
    value_parts: list[FloatArray] = []
    for p in layout:
        tensor = tensors[p.name]
        if isinstance(tensor, SparseTensor):
            index_parts.append(p.offset + np.asarray(tensor.indices, dtype=np.int64))
            value_parts.append(np.asarray(tensor.values, dtype=np.float32))
        else:
            index_parts.append(np.arange(p.offset, p.end, dtype=np.int64))
            value_parts.append(np.asarray(tensor, dtype=np.float32).reshape(-1))
    return np.concatenate(index_parts), np.concatenate(value_parts)


class Service:
    def __init__(self, cfg: ServerConfig, run_dir: Path, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.topics = Topics(cfg.root)
        self.model = ServerModel(cfg.artifacts)
        strategy = get_strategy(cfg.strategy, **cfg.strategy_params)
        method = server_method(cfg.method, cfg.method_params, self.model)
        self.scorer = Scorer(self.model, method, cfg.eval_data)
        assign: AssignPolicy = ProfileByDevice(dict(cfg.device_profiles), cfg.default_profile)
        if cfg.downgrade_on_oom:
            assign = DowngradeOnOom(assign, method)
        start = cfg.start_unix
        if start is None and resume:
            start = first_start(run_dir, cfg.time_dilation)
        self.board_clock = BoardClock(time.time() if start is None else start, cfg.time_dilation)
        clock = self._clock
        if resume and checkpoint.latest_version(run_dir) is not None:
            self.engine = checkpoint.load(run_dir, model=self.model, clock=clock, strategy=strategy,
                                          config=cfg.engine, assign=assign, method=method)
        else:
            self.engine = Engine(strategy, self.model, self.model.init, clock=clock, config=cfg.engine, assign=assign,
                                 method=method)
        for profile in sorted({cfg.default_profile, *cfg.device_profiles.values()}):
            # Refuse now what would otherwise stop the server at the first task for that device.
            why = self.engine.unassignable(profile)
            if why is not None:
                raise ConfigError(f"[assign] profile {profile!r} cannot be sent: {why}")
        self.out = Outputs(run_dir, resume, self.board_clock)
        self.out.event({"event": EventName.SERVER_START, "version": self.engine.version, "strategy": cfg.strategy,
                        "method": cfg.method, "method_params": dict(cfg.method_params),
                        "resume": resume, "model": self.model.model_name})
        # Per sender (topic) at most 4 frames in flight and a quarter of the budget, so a flood
        # from one id cannot evict the others' updates (runtime/chunks.py).
        self.reassembler = Reassembler(timeout_s=60.0, max_bytes=512 * 1024 * 1024,
                                       max_frame_bytes=DEFAULT_LIMITS.max_frame_bytes, max_sender_partials=4,
                                       max_sender_bytes=128 * 1024 * 1024)
        self.hello_limit = TokenBuckets(HELLO_BURST, HELLO_PER_S)
        self.reject_log = RejectLog()
        self.pending_row: dict[str, Any] | None = None
        self.finished: str | None = None
        creds = load_credentials(cfg.credentials)
        self.keys = dict(creds.device_keys)
        self.receipts: dict[tuple[str, str], Receipt] = {}
        offline = encode_json(self._state(online=False))
        self.mqtt = MqttClient(cfg.broker, MqttConfig(
            client_id=f"orchard-{cfg.server_id}", keepalive_s=10, ca_file=cfg.ca_file, cert_file=cfg.cert_file,
            key_file=cfg.key_file, username=creds.username,
            password=creds.password, will=Will(self.topics.server_state, offline, qos=1, retain=True)))
        self.outbound = Outbound(self.mqtt, self.topics, self.keys, cfg.run_id, self.model, self.out)

    def _clock(self) -> float:
        return self.board_clock.now()

    def _state(self, online: bool = True) -> ServerState:
        return ServerState(self.cfg.server_id, self.model.model_name, self.engine.version, self.cfg.strategy, online)

    # ------------------------------------------------------------ main loop
    def run(self) -> str:
        self.mqtt.connect()
        self.mqtt.subscribe(self.topics.all_devices, qos=1)
        self.mqtt.publish(self.topics.server_state, encode_json(self._state()), qos=1, retain=True)
        next_tick = time.monotonic()
        try:
            while self.finished is None:
                event = self.mqtt.get(timeout_s=0.05)
                if isinstance(event, Message):
                    self._on_message(event)
                elif isinstance(event, Connected) and event.reconnect:
                    self.out.event({"event": EventName.BROKER_RECONNECTED})
                    self.mqtt.publish(self.topics.server_state, encode_json(self._state()), qos=1, retain=True)
                elif isinstance(event, Disconnected):
                    self.out.event({"event": EventName.BROKER_DISCONNECTED, "reason": event.reason})
                if time.monotonic() >= next_tick:
                    self._feed(Tick())
                    for reason in self.reassembler.expire():
                        self._reject("frame", None, reason)
                    next_tick = time.monotonic() + TICK_S
        finally:
            self._flush_row()
            with contextlib.suppress(OrchardError):  # the broker may be gone; the Will covers it
                self.mqtt.publish(self.topics.server_state, encode_json(self._state(online=False)), qos=1,
                                  retain=True, wait_s=2.0)
            self.mqtt.close()
            self.out.event({"event": EventName.SERVER_STOP, "version": self.engine.version, "reason": self.finished})
            self.out.close()
        return self.finished or "stopped"

    def stop(self, reason: str = "stopped") -> None:
        self.finished = reason

    def _feed(self, event: Event) -> None:
        for action in self.engine.handle(event):
            self._act(action)

    # ------------------------------------------------------------ messages -> events
    def _on_message(self, msg: Message) -> None:
        parts = msg.topic[len(self.cfg.root) + 1:].split("/")
        if len(parts) != 3 or parts[0] != "dev" or not ID_PATTERN.fullmatch(parts[1]):
            return
        device_id, kind = parts[1], parts[2]
        if kind not in DEVICE_KINDS:
            return  # our own tasks, artifacts and receipts, echoed by the dev/+/+ subscription
        try:
            self._on_device_message(device_id, kind, msg)
        except OrchardError as exc:  # any bad input from a device is logged and dropped, never fatal
            self._reject(kind, device_id, str(exc))
        except Exception as exc:  # a bug a message found: refuse that message, keep serving the others
            log.exception("handling %s from %s", kind, device_id)
            self._reject(kind, device_id, f"internal error {type(exc).__name__}: {str(exc)[:200]}")

    def _reject(self, kind: str, device_id: str | None, reason: str) -> None:
        extra = self.reject_log.admit(kind, device_id)
        if extra is None:
            self.out.rejected += 1  # not logged, but server.csv's rejected_total counts it
            return
        who = {} if device_id is None else {"device": device_id}
        self.out.event({"event": EventName(f"{kind}_rejected"), **who, "reason": reason[:500], **extra})

    def _on_device_message(self, device_id: str, kind: str, msg: Message) -> None:
        roster = self.cfg.roster
        if roster is not None and device_id not in roster:
            raise ProtocolError(f"device {device_id!r} is not on the roster")
        # Known: said hello, or on the lab's roster (a device's telemetry starts before its hello).
        known = device_id in self.engine.devices or roster is not None
        if kind == "hello":
            if not self.hello_limit.allow(device_id):
                raise ProtocolError(f"hello from {device_id!r} refused: more than {HELLO_BURST} in "
                                    f"{HELLO_BURST / HELLO_PER_S:g} s")
            hello = decode_json(Hello, self._open(device_id, kind, msg.payload).payload, source=device_id,
                                max_bytes=HELLO_MAX_BYTES)
            self._check_sender(device_id, hello.device_id)
            self._feed(DeviceHello(device_id, hello))
            if device_id in self.engine.devices:  # the engine may refuse it (max_devices)
                self.outbound.known_artifacts[device_id] = set(hello.artifacts)
        elif kind == "status":
            if not known:
                raise ProtocolError(f"status from {device_id!r}, which has not said hello")
            status = decode_json(Status, self._open(device_id, kind, msg.payload).payload, source=device_id)
            self._check_sender(device_id, status.device_id)
            self.out.event({"event": EventName.DEVICE_STATUS, "device": device_id, "state": status.state,
                            "task_id": status.task_id, "detail": status.detail, "device_t": status.t})
            self._feed(DeviceStatus(device_id, status))
        elif kind == "telemetry":
            if not known:  # no file is opened for an id the engine never accepted a hello from
                raise ProtocolError(f"telemetry from {device_id!r}, which has not said hello")
            telemetry = decode_json(Telemetry, self._open(device_id, kind, msg.payload).payload, source=device_id)
            self._check_sender(device_id, telemetry.device_id)
            self.out.telemetry(telemetry)
        elif kind == "update":
            if not known:  # nothing is reassembled for an id the engine does not know
                raise ProtocolError(f"update chunk from {device_id!r}, which has not said hello")
            # With the device's key, the MAC is computed as the chunks come (runtime/chunks.py).
            frame = self.reassembler.feed(msg.topic, msg.payload, mac_key=self.keys.get(device_id))
            if frame is not None:
                self._on_update_frame(device_id, frame, self.reassembler.completed_wire_bytes)

    def _open(self, device_id: str, kind: str, data: bytes | memoryview) -> Opened:
        key = self.keys.get(device_id)
        if key is None:
            raise ProtocolError(f"{kind} from {device_id}: no key for this device in the lab's credentials")
        return open_sealed(data, key=key, run_id=self.cfg.run_id, device_id=device_id, kind=kind)

    def _send_receipt(self, device_id: str, task_id: str, accepted: bool, reason: str = "",
                      final: bool = True) -> None:
        """`final`: the engine's verdict, which settles the task, so a re-sent copy gets it again.
        A frame refused before the engine saw it settles nothing: a good copy may still count."""
        if device_id not in self.keys:
            return
        receipt = Receipt(device_id, task_id, accepted, reason[:300])
        if final:
            self.receipts[(device_id, task_id)] = receipt
            while len(self.receipts) > RECEIPTS_KEPT:
                del self.receipts[next(iter(self.receipts))]
        self.outbound.publish_receipt(receipt)

    @staticmethod
    def _check_sender(topic_id: str, claimed: str) -> None:
        if topic_id != claimed:
            raise ProtocolError(f"message on the topic of {topic_id!r} claims to be from {claimed!r}")

    def _on_update_frame(self, device_id: str, frame: memoryview, wire_bytes: int) -> None:
        # bytes: what the broker carried (chunks with their headers); frame_bytes: the frame alone.
        received = {"event": EventName.UPDATE_RECEIVED, "device": device_id, "bytes": wire_bytes,
                    "frame_bytes": len(frame)}
        try:
            update = self.board_clock.update(decode_update(self._open(device_id, "update", frame), source=device_id))
        except OrchardError:
            self.out.event(received)  # a refused frame still crossed the link: count its bytes
            raise
        metrics = {k: round(float(v), 4) for k in ("step_ms_median", "loss_last")
                   if isinstance(v := update.metrics.get(k), (int, float)) and np.isfinite(v)}
        self.out.event({**received, "task_id": update.task_id, **metrics})
        answered = self.receipts.get((device_id, update.task_id))
        if answered is not None:  # a re-sent copy (its receipt was lost): counted once, told again
            self.out.event({"event": EventName.UPDATE_REPEATED, "device": device_id, "task_id": update.task_id})
            self.outbound.publish_receipt(answered)
            return
        try:
            self._admit_update(device_id, update)
        except OrchardError as exc:
            self._send_receipt(device_id, update.task_id, False, str(exc), final=False)
            raise

    def _admit_update(self, device_id: str, update: Update) -> None:
        task = self.engine.outstanding.get(update.task_id)
        if task is None or task.device_id != device_id:
            # Let the engine name the reason (unknown task, duplicate, wrong device).
            self._feed(UpdateReceived(device_id, update, np.zeros(0, dtype=np.float32)))
            return
        layout = self.model.by_key(task.assignment.primary_key).manifest.layout
        validate_tensors(update.tensors, {p.name: p.shape for p in layout}, source=device_id)
        local, values = update_body(layout, update.tensors)
        if local is None:
            self._feed(UpdateReceived(device_id, update, values))
            return
        indices = local if task.indices is None else task.indices[local]
        self._feed(UpdateReceived(device_id, update, values, indices))

    # ------------------------------------------------------------ actions -> the world
    def _act(self, action: Action) -> None:
        if isinstance(action, Log):
            record = dict(action.event)
            self.out.event(record)
            kind = record.get("event")
            if kind in (EventName.UPDATE_ACCEPTED, EventName.UPDATE_REJECTED) and "task_id" in record:
                self._send_receipt(str(record.get("device")), str(record["task_id"]),
                                   kind == EventName.UPDATE_ACCEPTED, str(record.get("reason", "")))
        elif isinstance(action, SendTask):
            self.outbound.send_task(action, self.engine.global_flat, self.cfg.train, self.board_clock.dilation)
        elif isinstance(action, NewGlobal):
            checkpoint.save(self.run_dir, self.engine)
            self.mqtt.publish(self.topics.server_state, encode_json(self._state()), qos=1, retain=True)
            self._flush_row()
            stale = action.staleness
            self.pending_row = {
                "round": action.round, "version": action.version, "t_s": round(action.t, 3),
                "n_updates": action.n_updates, "devices": " ".join(action.device_ids), "reason": action.reason,
                "staleness_mean": round(float(np.mean(stale)), 3) if stale else 0,
                "staleness_max": max(stale) if stale else 0,
            }
        elif isinstance(action, Evaluate):
            ev = self.scorer.served(self.engine.method, self.engine.global_flat)
            self.out.event({"event": EventName.EVALUATE, "version": action.version, "accuracy": ev.accuracy,
                            "loss": ev.loss, "t": round(self._clock(), 3),
                            **({"exit_accuracy": list(ev.exit_accuracy)} if ev.exit_accuracy else {})})
            if self.pending_row is not None and self.pending_row["version"] == action.version:
                self.pending_row.update(accuracy=round(ev.accuracy, 5), loss=round(ev.loss, 5))
            self._flush_row()
            log.info("version %d: accuracy %.4f", action.version, ev.accuracy)
            target = self.cfg.target_accuracy
            if target is not None and ev.accuracy >= target and self.finished is None:
                self.finished = f"target accuracy {target:g} reached"
            for profile, sub in self.scorer.profiles(self.engine.global_flat):
                self.out.event({"event": EventName.EVALUATE_PROFILE, "version": action.version, "profile": profile,
                                "accuracy": sub.accuracy, "loss": sub.loss})
        elif isinstance(action, Finish):
            self.finished = action.reason

    def _flush_row(self) -> None:
        if self.pending_row is not None:
            self.pending_row.update(accepted_total=self.out.accepted, rejected_total=self.out.rejected)
            self.out.server_row(self.pending_row)
            self.pending_row = None
