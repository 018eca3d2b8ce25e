"""The device agent: what a board runs (`orchard device`, `python -m runtime`).

It owns the MQTT connection, telemetry and the task lifecycle (that part in
runtime/agent_tasks.py, a base class of `Agent`); a trainer child process owns
ONNX Runtime (see runtime/trainer_proc.py for why). One loop, no callbacks doing work: MQTT
events come from a queue, the trainer is polled, telemetry is sampled on its schedule.

Faults it survives: the trainer dying mid-task (reported with its cause, restarted), the broker
or the server going away (paho reconnects with backoff; the hello and any update finished
meanwhile wait until the server's retained state says it is online again), bad frames (dropped
with a logged reason; the server times the task out).

Trust (runtime/seal.py): everything on this device's topics is sealed under its own key, bound
to the run and the device, and opened before use; a task already run is not run again; an
artifact is stored only when a task that names it gives its manifest hash, and the manifest has
it. Nothing lost: an update stays in the outbox (runtime/outbox.py) until the server's receipt
for it comes, and is sent again after every reconnect (and, without one, after a backoff).

Start-up (issue 16): what the hello needs is all that runs before it. The agent never imports
ONNX Runtime, and imports numpy (with the frame codec and the manifests) only when the first
task or artifact arrives; the hello's sample count and label histogram come from the shard read
without numpy (runtime/shard.py). What the hello does not need (the trainer child, the telemetry
sampler with psutil and the power models, the outbox with the chunker) is imported and started
right after the first hello has left (`_start_services`), or sooner if the agent is idle before
it (connected, and IDLE_POLLS polls passed with no online server to greet): on a Pi Zero 2 W (0.048
host cores) every 10 ms of CPU before the hello is 0.2 s of it. The trainer child runs at a lower CPU
priority than the agent (runtime/trainer_proc.py); it is not started earlier because nice
weighs tasks only on one CPU's run queue, and the device's two processes on two host CPUs
shared its quota alike. A task that arrives before the trainer is ready waits for it (`queued`).
Telemetry rows start at the hello too: the server hears none sent before it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from runtime import __version__, startup
from runtime.agent_tasks import MANIFEST, TaskLifecycle, cgroup_limits
from runtime.board import load_board
from runtime.credentials import load_credentials
from runtime.device_config import DeviceConfig
from runtime.errors import ConfigError, OrchardError, ProtocolError, TransportError
from runtime.mqtt import Connected, Disconnected, Message, MqttClient, MqttConfig, Will
from runtime.protocol import (
    Hello,
    Receipt,
    ServerState,
    Status,
    Telemetry,
    TelemetrySample,
    Topics,
    decode_json,
    encode_json,
)
from runtime.sdnotify import SdNotify
from runtime.seal import Opened, open_sealed, seal
from runtime.shard import label_histogram
from runtime.tiering import Limits, TierCache, choose_tier

if TYPE_CHECKING:
    from runtime.chunks import Reassembler
    from runtime.manifest import StagedArtifacts

log = logging.getLogger("orchard.device")

TELEMETRY_BATCH_S = 1.0  # publish buffered samples at most this often
REASSEMBLY_TIMEOUT_S = 60.0
REASSEMBLY_MAX_BYTES = 256 * 1024 * 1024
SHUTDOWN_RECONNECT_S = 2.0
# Polls (poll_s each, board time) without any event before the services start unasked: under
# load a retained server state can take more than one poll to arrive (measured: 2 of 14 starts at
# load 30 started the trainer before the hello with 1).
IDLE_POLLS = 10
HELLO_ACK_WAIT_S = 2.0  # the first hello's PUBACK, awaited before the rest starts (_announce)
TELEMETRY_BACKLOG = 3600  # samples kept while the broker is unreachable (an hour at 1 Hz)


class Agent(TaskLifecycle):
    def __init__(self, cfg: DeviceConfig) -> None:
        self.cfg = cfg
        self.id = cfg.device_id
        # Credentials first: without them nothing else is worth starting (a trainer child included).
        cfg.check_provisioned()
        self.creds = load_credentials(cfg.credentials)
        startup.mark("credentials")
        if self.creds.hmac_key is None:
            raise ConfigError(f"{cfg.credentials}: a device's credentials need hmac_key")
        self.key: bytes = self.creds.hmac_key
        self.topics = Topics(cfg.root)
        self.board = load_board(cfg.board)
        cfg.artifact_cache.mkdir(parents=True, exist_ok=True)
        self.n_samples, self.label_histogram = label_histogram(cfg.shard)
        self._said_hello = False
        # trainer, sampler, freeze, outbox, threads: set by _start_services (runtime/agent_tasks.py),
        # after the first hello.
        self.services_up = False
        self.state = "idle"
        self.running = None
        self.waiting_for_artifact = None
        # A task that arrived while the trainer was busy. The server only sends one when it has
        # given up on the running task (timed out, or the device was marked offline), so this is
        # the one that counts; it starts as soon as the trainer is free.
        self.queued = None
        self.done_tasks = {}  # oldest first, at most DONE_TASKS
        self._staged: StagedArtifacts | None = None  # authenticated, not named by a task yet
        # A task's deadline counts from its arrival; the time it waits for its artifacts or the
        # trainer, and the time its update takes to pack and publish (the last one's, measured),
        # come off what the trainer may use.
        self._received_at = {}
        self.upload_s = 0.0
        self.server: ServerState | None = None
        self.greeted = False  # hello sent to the server since our last (re)connect / its last restart
        self._reassembler: Reassembler | None = None  # made with the first chunk (it needs the frame codec)
        self.samples: list[TelemetrySample] = []
        # Tier by resources (runtime/tiering.py): measurements kept next to the artifact cache.
        state = cfg.artifact_cache.with_name(cfg.artifact_cache.name + ".state")
        self.tiers = TierCache(state / "tiers.json") if cfg.tier == "by-resources" else None
        self.tier_steps = 1  # what the last task asked (steps, deadline); nothing before the first
        self.tier_deadline_s: float | None = None
        self.tier, self.tier_reason = self._choose_tier()
        self.stop_event = threading.Event()
        self.notify = SdNotify.from_env()
        offline = self._seal("status", encode_json(Status(self.id, "offline", time.time(), detail="connection lost")))
        self.mqtt = MqttClient(cfg.broker_url, MqttConfig(
            client_id=f"orchard-dev-{self.id}", keepalive_s=cfg.keepalive_s, ca_file=cfg.ca_file,
            cert_file=cfg.cert_file, key_file=cfg.key_file, username=self.creds.username,
            password=self.creds.password, will=Will(self.topics.status(self.id), offline, qos=1, retain=True),
        ))
        startup.mark("agent_init")

    @property
    def staged(self) -> StagedArtifacts:
        if self._staged is None:
            from runtime.manifest import StagedArtifacts

            self._staged = StagedArtifacts(self.cfg.artifact_cache)
        return self._staged

    @property
    def reassembler(self) -> Reassembler:
        if self._reassembler is None:
            from runtime.chunks import Reassembler
            from runtime.frames import DEFAULT_LIMITS  # numpy, from the first artifact or task on

            self._reassembler = Reassembler(REASSEMBLY_TIMEOUT_S, REASSEMBLY_MAX_BYTES,
                                            max_frame_bytes=DEFAULT_LIMITS.max_frame_bytes)
        return self._reassembler

    def _seal(self, kind: str, payload: bytes) -> bytes:
        return seal(payload, key=self.key, run_id=self.cfg.run_id, device_id=self.id, kind=kind)

    def _update_chunks(self, frame: bytes, msg_id: str, chunk_bytes: int) -> Iterator[bytes]:
        from runtime.chunks import chunk_sealed  # not before the hello (runtime/agent.py's doc)

        return chunk_sealed(frame, key=self.key, run_id=self.cfg.run_id, device_id=self.id, kind="update",
                            msg_id=msg_id, chunk_bytes=chunk_bytes)

    def _open(self, kind: str, payload: bytes | memoryview) -> Opened:
        return open_sealed(payload, key=self.key, run_id=self.cfg.run_id, device_id=self.id, kind=kind,
                           source="server")

    # ------------------------------------------------------------ lifecycle
    def run(self) -> int:
        try:
            self._connect()
        except BaseException:
            self.mqtt.close()  # nothing else is started before the first hello
            raise
        startup.mark("connected")
        startup.release_gc()
        # The first wait is a whole poll too (see the idle start of the services below).
        next_sample = next_publish = next_expire = time.monotonic() + self.cfg.poll_s
        idle_polls = 0
        self.notify.ready(f"device {self.id} connected to {self.cfg.broker_url.split('@')[-1]}")
        # No hello yet: it goes out when the server's (retained) state says it is online (see
        # _on_message). A hello sent before the server subscribed would be lost for good.
        try:
            while not self.stop_event.is_set():
                self.notify.tick()  # systemd's watchdog: a loop that stops turning gets restarted
                # Woken for the next sample too: a poll_s scaled by dilation would otherwise make
                # samples up to poll_s late, and the 1/hz grid jitter by as much.
                event = self.mqtt.get(timeout_s=min(self.cfg.poll_s, max(0.0, next_sample - time.monotonic())))
                if event is not None:
                    self._on_event(event)
                    idle_polls = 0
                elif not self.services_up:
                    # IDLE_POLLS whole polls without an event before any hello: no online server
                    # to greet (its retained state comes with the subscription), so nothing competes.
                    idle_polls += 1
                    if idle_polls >= IDLE_POLLS:
                        self._start_services()
                now = time.monotonic()
                if not self.services_up:  # before the first hello: nothing to poll, sample or resend
                    next_sample = next_publish = next_expire = now + self.cfg.poll_s
                    continue
                self._poll_trainer()
                if now >= next_sample:
                    self.samples.append(self.sampler.sample(self.state))
                    # On a fixed grid, so the rate does not drift below telemetry_hz; after a stall
                    # (a frozen cgroup) restart the grid instead of bursting to catch up.
                    next_sample += 1.0 / self.cfg.telemetry_hz
                    if next_sample < now:
                        next_sample = now + 1.0 / self.cfg.telemetry_hz
                if now >= next_publish and self.samples:
                    self._publish_telemetry()
                    next_publish = now + TELEMETRY_BATCH_S
                if now >= next_expire:
                    for reason in self._reassembler.expire() if self._reassembler is not None else ():
                        log.warning("%s: dropped a partial frame: %s", self.id, reason)
                    if self._reachable():
                        for task_id in self.outbox.send_due():
                            log.warning("%s: no receipt for update %s yet; sent again", self.id, task_id)
                    next_expire = now + 5.0
        finally:
            self._shutdown()
        return 0

    def _connect(self) -> None:
        self.mqtt.connect()
        # Our own status too: a Last Will from a connection our reconnect superseded can land
        # after we are back, and would leave a live device marked offline (see _on_message).
        for topic in (self.topics.task(self.id), self.topics.artifact(self.id), self.topics.server_state,
                      self.topics.status(self.id), self.topics.receipt(self.id)):
            try:
                self.mqtt.subscribe(topic, qos=1)
            except TransportError as exc:
                if not self.mqtt.is_subscribed(topic):
                    raise  # refused by the broker: we would never hear that topic
                # A freeze (an emulated board taken offline during start-up) can outlast the wait
                # for the SUBACK; the subscription stays registered and goes out with the next
                # CONNACK, so the device joins once it is back instead of exiting.
                log.warning("%s: %s; it is sent again when the connection is back", self.id, exc)

    def _shutdown(self) -> None:
        self.notify.stopping()
        if self.services_up:  # a last row, so the trace covers the run up to its end (offline too)
            self.samples.append(self.sampler.sample(self.state))
        reconnect_by = time.monotonic() + SHUTDOWN_RECONNECT_S  # thawed at the end: paho reconnects
        while not self.mqtt.is_connected and time.monotonic() < reconnect_by:
            time.sleep(0.05)
        try:
            if self.services_up:
                self._publish_telemetry(wait_s=2.0)
            if self.mqtt.is_connected:
                status = self._seal("status", encode_json(Status(self.id, "offline", time.time(), detail="shut down")))
                self.mqtt.publish(self.topics.status(self.id), status, qos=1, retain=True, wait_s=2.0)
        except TransportError as exc:
            log.warning("%s: could not say goodbye: %s", self.id, exc)
        if self.services_up:  # before the first hello there is neither trainer nor freeze watch
            self.trainer.close()
            self.freeze.close()
        self.mqtt.close()

    def _choose_tier(self) -> tuple[str, str]:
        """(profile, reason); with a fixed tier the configured order stands."""
        if self.tiers is None:
            return self.cfg.profiles[0], ""
        limits = self.sampler.limits if self.services_up else cgroup_limits()
        quota = limits.cpu_quota_cores() or float(self.board.cores)
        cap = limits.mem_limit_mb() or float(self.board.ram_mb)
        return choose_tier(self.cfg.profiles, self.tiers.entries,
                           Limits(cap, quota, self.tier_steps, self.tier_deadline_s))

    def _announce(self) -> None:
        keys = tuple(sorted(p.name for p in self.cfg.artifact_cache.iterdir() if (p / MANIFEST).is_file()))
        # The hello's first profile is the device's choice when it tiers itself by resources.
        profiles = (self.tier, *(p for p in self.cfg.profiles if p != self.tier))
        hello = Hello(
            device_id=self.id, board=self.board.name, cores=float(self.board.cores), ram_mb=self.board.ram_mb,
            runtime_version=__version__, profiles=profiles, n_samples=self.n_samples,
            label_histogram=self.label_histogram, artifacts=keys,
        )
        ticket = self.mqtt.publish(self.topics.hello(self.id), self._seal("hello", encode_json(hello)), qos=1)
        if not self._said_hello:
            self._said_hello = True
            startup.mark("hello")
            log.info("%s: %s", self.id, startup.line())
            # paho's thread sends it, and needs the GIL to: started at once, the imports below
            # would hold it for a switch interval at a time, ~0.1 s of a Zero 2 W's quota each.
            with contextlib.suppress(TransportError):  # not acked yet: it stays queued and goes out
                ticket.wait(HELLO_ACK_WAIT_S)
            self._start_services()
        detail = f"tier {self.tier} by resources: {self.tier_reason}" if self.tiers is not None else ""
        self._set_state(self.state, self.running.task.task_id if self.running else None, detail=detail)
        # A row the server surely hears (it is subscribed once its state is online): rows sent
        # before it subscribed are lost, and a short run could end before the next batch. The
        # row's cumulative energy_j carries whatever the lost rows covered.
        self.samples.append(self.sampler.sample(self.state))
        self._publish_telemetry()

    def _set_state(self, state: str, task_id: str | None = None, detail: str = "", failure: str | None = None) -> None:
        self.state = state
        status = Status(self.id, state, time.time(), task_id=task_id, detail=detail, failure=failure)
        try:
            self.mqtt.publish(self.topics.status(self.id), self._seal("status", encode_json(status)), qos=1,
                              retain=True)
        except TransportError as exc:  # QoS 1 is queued while offline; this is a refused publish
            log.warning("%s: status %s not sent: %s", self.id, state, exc)

    def _publish_telemetry(self, wait_s: float | None = None) -> None:
        # No row may be lost: each is the mean power over its own interval since the previous
        # row, so a hole would hide that interval's energy from anyone integrating the trace. So
        # QoS 1 (DESIGN has 0; a QoS-0 batch sent just as a thawed board's dead connection is
        # noticed vanished), and rows are held back while the broker is unreachable.
        if not self.mqtt.is_connected:
            del self.samples[:-TELEMETRY_BACKLOG]
            return
        batch = Telemetry(self.id, self.sampler.power_source, tuple(self.samples))
        try:
            self.mqtt.publish(self.topics.telemetry(self.id), self._seal("telemetry", encode_json(batch)), qos=1,
                              wait_s=wait_s)
        except TransportError as exc:  # refused outright: keep the rows for the next try
            log.warning("%s: telemetry held back: %s", self.id, exc)
            del self.samples[:-TELEMETRY_BACKLOG]
            return
        self.samples = []

    # ------------------------------------------------------------ events
    def _on_event(self, event: Connected | Disconnected | Message) -> None:
        if isinstance(event, Connected):
            if event.reconnect:
                # Hello and outbox wait for the server's state: retained on the broker if only we
                # dropped out, or published by the server once it is back if the broker restarted
                # (and lost it). Sent now, they could beat the server's own re-subscription.
                log.info("%s: reconnected", self.id)
        elif isinstance(event, Disconnected):
            log.warning("%s: disconnected: %s", self.id, event.reason)
            self.greeted = False
        else:
            try:
                self._on_message(event)
            except OrchardError as exc:
                log.warning("%s: dropped message on %s: %s", self.id, event.topic, exc)

    def _on_message(self, msg: Message) -> None:
        if not msg.payload:
            return  # a retained message being cleared
        if msg.topic == self.topics.status(self.id):
            own = decode_json(Status, open_sealed(msg.payload, key=self.key, run_id=self.cfg.run_id,
                                                  device_id=self.id, kind="status").payload, source=self.id)
            if own.state == "offline" and self.greeted and not self.stop_event.is_set():
                log.warning("%s: a stale Last Will said we are offline; announcing again", self.id)
                self._announce()
            return
        if msg.topic == self.topics.server_state:
            if msg.payload and msg.payload != b"offline":
                self.server = decode_json(ServerState, msg.payload, source="server")
                if not self.server.online:
                    self.greeted = False
                    # It may come back fresh, counting task ids from t1 again: only a server that
                    # stayed up can replay a task id (and a forged state can at most re-open
                    # replays of real tasks, whose updates the server refuses).
                    self.done_tasks.clear()
                elif not self.greeted:
                    # First sight of an online server since we (re)connected or it (re)started:
                    # a fresh server has not heard our hello, a resumed one only knows its
                    # checkpoint. Tell it who we are, then send what finished meanwhile.
                    self.greeted = True
                    self._announce()
                    self._flush_outbox()
            return
        self._start_services()  # a receipt, task or artifact; the server sends none before our hello
        if msg.topic == self.topics.receipt(self.id):
            self._on_receipt(decode_json(Receipt, self._open("receipt", msg.payload).payload, source="server"))
            return
        arrived = time.monotonic()
        frame = self.reassembler.feed(msg.topic, msg.payload, mac_key=self.key)  # the MAC as chunks come
        if frame is None:
            return
        from runtime.frames import decode_artifact, decode_task

        if msg.topic == self.topics.artifact(self.id):
            self._on_artifact(decode_artifact(self._open("artifact", frame), source="server"))
        elif msg.topic == self.topics.task(self.id):
            task = decode_task(self._open("task", frame), source="server")
            if task.task_id in self.done_tasks or (self.running is not None and
                                                   self.running.task.task_id == task.task_id):
                raise ProtocolError(f"task {task.task_id} was already received (a replay); not run again")
            self._remember(task.task_id)
            self._received_at[task.task_id] = arrived
            while len(self._received_at) > 8:  # tasks that never ran (superseded) leave no trace
                del self._received_at[next(iter(self._received_at))]
            self._on_task(task)



def run_device(cfg: DeviceConfig) -> int:
    agent = Agent(cfg)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stop_event.set())
    return agent.run()
