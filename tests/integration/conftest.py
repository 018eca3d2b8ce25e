"""Fixtures for the federation and fault-injection tests: a run folder, a real broker, the server
and device processes, a fake device (a plain MQTT client on a device's topics), and bounded
waits on events.jsonl and server.csv.

Cleanup is the fixture's job, whatever the test did: every process group started here is
stopped and checked gone, and every broker closed, in the finalizer. A wait that runs out fails
the test with the tail of events.jsonl and of the server log, so a failure says what happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.chunks import Reassembler, chunk_frame
from runtime.credentials import load_credentials
from runtime.frames import decode_task, encode_update
from runtime.mqtt import Message, MqttClient, MqttConfig
from runtime.protocol import Hello, ServerState, Status, Task, Topics, Update, decode_json, encode_json
from runtime.seal import open_sealed, seal
from runtime.tomlconf import load_toml
from testbed.broker import AmqttBroker, Broker, MosquittoBroker
from testbed.federate import Federation, FederationSpec, prepare, server_rows, write_toml
from testbed.lab_secrets import Lab, load_lab

WAIT_S = 30.0  # upper bound of any single wait; only reached when something is broken
Record = dict[str, Any]

# Small and fast: LeNet on digits, a few local steps, 2 s keepalives so a dead client's Last Will
# fires ~3 s after it goes silent (amqtt is patched to 1.5 x keepalive, testbed/broker.py).
TEST_SPEC: dict[str, Any] = {
    "devices": 3, "rounds": 5, "model": "lenet", "dataset": "digits", "partition": "iid", "local_steps": 10,
    "keepalive_s": 2, "task_timeout_s": 20.0, "time_limit_s": 150.0,
}


class EventLog:
    """events.jsonl read incrementally; `records` keeps every complete line seen so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[Record] = []
        self._offset = 0
        self._partial = b""

    def refresh(self) -> list[Record]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return self.records
        if size < self._offset:  # truncated by a fresh server start: read it again
            self.records, self._offset, self._partial = [], 0, b""
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        self.records.extend(json.loads(line) for line in lines if line.strip())
        return self.records


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def matches(record: Record, event: str, fields: Mapping[str, Any]) -> bool:
    return record.get("event") == event and all(record.get(k) == v for k, v in fields.items())


class Harness:
    """One run: its folder, broker and processes, and waits on what the server writes."""

    def __init__(self, spec: FederationSpec, run: Path, broker: Broker) -> None:
        self.spec = spec
        self.run = run
        self.broker = broker
        self.fed = Federation(run, broker.url)
        self.events = EventLog(run / "events.jsonl")
        self.root = f"orchard/{run.name}"
        self.lab: Lab = load_lab(run)
        self.fakes: list[FakeDevice] = []
        self._groups: set[int] = set()  # every process group started, checked gone at close

    # ----- processes
    def start_server(self, resume: bool = False) -> None:
        self.fed.start_server(resume)
        assert self.fed.server is not None
        self._groups.add(self.fed.server.pid)

    def start_device(self, device_id: str) -> None:
        self.fed.start_device(device_id)
        self._groups.add(self.fed.devices[device_id].pid)

    def start(self, devices: list[str] | None = None) -> None:
        self.start_server()
        for device_id in self.spec.device_ids() if devices is None else devices:
            self.start_device(device_id)

    def start_warm(self, devices: list[str] | None = None) -> None:
        """Devices first, the server once every device's trainer child is up. The hello does not
        wait for the trainer (runtime/agent.py), so in a run of a few sub-second rounds a device
        whose trainer starts last could miss them all; tests that need every device in every
        round start like this (the devices wait for the server's online state to say hello)."""
        ids = self.spec.device_ids() if devices is None else devices
        for device_id in ids:
            self.start_device(device_id)

        def ready() -> bool:
            logs = {d: self.run / "logs" / f"{d}.log" for d in ids}
            return all(p.exists() and f"{d}: trainer " in p.read_text(errors="replace") for d, p in logs.items())

        self.wait_until(ready, "every device's trainer child up")
        self.start_server()

    def fake(self, device_id: str, **kw: Any) -> FakeDevice:
        fake = FakeDevice(self, device_id, **kw)
        self.fakes.append(fake)
        return fake

    def close(self) -> list[int]:
        """Stop everything; return the process groups that had to be SIGKILLed afterwards."""
        for fake in self.fakes:
            fake.close()
        self.fed.stop_all()
        # The group leaders are reaped by stop_all; their children (trainer, multiprocessing's
        # resource tracker) exit on the closed pipe a moment later and are reaped by init.
        deadline = time.monotonic() + 5.0
        alive = set(self._groups)
        while alive and time.monotonic() < deadline:
            alive = {pgid for pgid in alive if _group_alive(pgid)}
            time.sleep(0.05)
        for pgid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.broker.close()
        return sorted(alive)

    # ----- what the server wrote
    def mark(self) -> int:
        """Index of the next event: pass it as `after` to wait for something that happens later."""
        return len(self.events.refresh())

    def find(self, event: str, after: int = 0, **fields: Any) -> list[Record]:
        return [r for r in self.events.refresh()[after:] if matches(r, event, fields)]

    def rows(self) -> list[dict[str, str]]:
        return server_rows(self.run)

    def versions(self) -> list[int]:
        return [int(r["version"]) for r in self.rows()]

    def diagnose(self) -> str:
        tail = [json.dumps(r)[:240] for r in self.events.refresh()[-25:]]
        logs = []
        for log in sorted((self.run / "logs").glob("*.log")):
            text = log.read_text(errors="replace").strip().splitlines()[-6:]
            logs.append(f"--- {log.name}\n" + "\n".join(text))
        return "events.jsonl tail:\n" + "\n".join(tail) + "\n" + "\n".join(logs)

    def wait_until(self, check: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout_s:g} s\n{self.diagnose()}")
            time.sleep(0.05)

    def wait(self, event: str, after: int = 0, timeout_s: float = WAIT_S, **fields: Any) -> tuple[int, Record]:
        """The first `event` with these field values at index >= after, and its index."""

        def check() -> tuple[int, Record] | None:
            records = self.events.refresh()
            for i in range(after, len(records)):
                if matches(records[i], event, fields):
                    return i, records[i]
            return None

        result: tuple[int, Record] = self.wait_until(check, f"{event} {fields} after #{after}", timeout_s)
        return result

    def wait_version(self, version: int, timeout_s: float = WAIT_S) -> None:
        self.wait_until(lambda: any(v >= version for v in self.versions()), f"server.csv version {version}",
                        timeout_s)

    def wait_server_exit(self, timeout_s: float = WAIT_S) -> int:
        server = self.fed.server
        assert server is not None
        code: int = self.wait_until(lambda: server.poll() is not None and (server.returncode,),
                                    "server exit", timeout_s)[0]
        return code

    def checkpoint_global(self) -> tuple[int, np.ndarray]:
        directory = self.run / "checkpoint"
        state = json.loads((directory / "state.json").read_text())
        return int(state["version"]), np.load(directory / state["global_file"])

    def edit_server_toml(self, table: str, **values: Any) -> None:
        path = self.run / "configs" / "server.toml"
        data = load_toml(path)
        data.setdefault(table, {}).update(values)
        write_toml(path, data)


class FakeDevice:
    """A plain MQTT client on one device's topics: says hello, receives its tasks, and publishes
    whatever bytes a test wants on its update topic, as a misbehaving or hostile client would.

    It holds the device's own login and key from the lab, so what it sends is sealed as the
    real device's would be. A device the lab does not know logs in as the server (an insider
    with the broker's run of the root) and seals under a key nobody else has."""

    def __init__(self, h: Harness, device_id: str, profiles: tuple[str, ...] = ("dense",),
                 n_samples: int = 50) -> None:
        self.device_id = device_id
        self.topics = Topics(h.root)
        self.profiles = profiles
        self.n_samples = n_samples
        self.run_id = h.lab.run_id
        creds = h.lab.devices.get(device_id) or load_credentials(h.lab.server_file)
        self.key = creds.hmac_key or bytes(32)
        ca = str(h.lab.tls.ca_file) if h.lab.tls and h.broker.url.startswith("mqtts") else None
        self.client = MqttClient(h.broker.url, MqttConfig(f"fake-{device_id}-{uuid.uuid4().hex[:6]}",
                                                          keepalive_s=5, username=creds.username,
                                                          password=creds.password, ca_file=ca))
        self.client.connect()
        for topic in (self.topics.task(device_id), self.topics.artifact(device_id), self.topics.server_state,
                      self.topics.receipt(device_id)):
            self.client.subscribe(topic, qos=1)
        self.reassembler = Reassembler(timeout_s=60.0, max_bytes=64 * 1024 * 1024)
        self.server_online = False
        self.receipts: list[bytes] = []  # sealed receipts seen while waiting for tasks

    def _next(self, timeout_s: float) -> Message | None:
        ev = self.client.get(timeout_s)
        if isinstance(ev, Message) and ev.topic == self.topics.server_state:
            self.server_online = decode_json(ServerState, ev.payload).online
            return None
        return ev if isinstance(ev, Message) else None

    def hello(self, timeout_s: float = WAIT_S) -> None:
        """Say hello once the server is online (a hello before it subscribed would be lost)."""
        deadline = time.monotonic() + timeout_s
        while not self.server_online:
            if time.monotonic() > deadline:
                pytest.fail(f"fake {self.device_id}: server not online within {timeout_s:g} s")
            self._next(0.1)
        msg = Hello(device_id=self.device_id, board="fake", cores=1.0, ram_mb=1024, runtime_version="fake",
                    profiles=self.profiles, n_samples=self.n_samples, label_histogram=(), artifacts=())
        self.client.publish(self.topics.hello(self.device_id), self.seal("hello", encode_json(msg)), qos=1, wait_s=10)
        self.status("idle")

    def seal(self, kind: str, payload: bytes) -> bytes:
        return seal(payload, key=self.key, run_id=self.run_id, device_id=self.device_id, kind=kind)

    def status(self, state: str) -> None:
        msg = Status(self.device_id, state, time.time())
        self.client.publish(self.topics.status(self.device_id), self.seal("status", encode_json(msg)), qos=1,
                            retain=True, wait_s=10)

    def next_task(self, timeout_s: float = WAIT_S) -> Task:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            ev = self._next(left)
            if ev is None:
                continue
            if ev.topic == self.topics.receipt(self.device_id):
                self.receipts.append(ev.payload)
                continue
            frame = self.reassembler.feed(ev.topic, ev.payload)
            if frame is not None and ev.topic == self.topics.task(self.device_id):
                opened = open_sealed(frame, key=self.key, run_id=self.run_id, device_id=self.device_id, kind="task")
                return decode_task(opened.payload, source="server")
        pytest.fail(f"fake {self.device_id}: no task within {timeout_s:g} s")

    def update(self, task: Task, shift: float = 0.0, **tensors: np.ndarray) -> Update:
        """An update for `task`: its own weights moved by `shift`, or `tensors` as given."""
        values = {k: np.asarray(v, np.float32) + np.float32(shift) for k, v in task.tensors.items()}
        values.update(tensors)
        return Update(task_id=task.task_id, device_id=self.device_id, base_version=task.base_version,
                      n_samples=self.n_samples, train_s=0.1, peak_rss_mb=1.0, energy_j=None, kind="weights",
                      metrics={}, tensors=values)

    def publish(self, payload: bytes) -> None:
        self.client.publish(self.topics.update(self.device_id), payload, qos=1, wait_s=10)

    def send_frame(self, frame: bytes, msg_id: str | None = None, sealed: bool = True) -> None:
        """Chunk and publish `frame`, sealed as an update of this device unless `sealed` is False."""
        for chunk in chunk_frame(self.seal("update", frame) if sealed else frame, msg_id or uuid.uuid4().hex):
            self.publish(chunk)

    def send_update(self, update: Update, msg_id: str | None = None) -> bytes:
        frame = encode_update(update)
        self.send_frame(frame, msg_id)
        return frame

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def federation(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Harness]]:
    """`federation(broker="amqtt"|"mosquitto", **spec)` -> a prepared, not yet started Harness."""
    made: list[Harness] = []

    def make(broker: str = "amqtt", **spec_kw: Any) -> Harness:
        spec = FederationSpec(out=tmp_path / f"run{len(made)}", **{**TEST_SPEC, **spec_kw})
        run = prepare(spec)
        lab = load_lab(run)
        b: Broker = (MosquittoBroker(binary=request.getfixturevalue("mosquitto_bin"), lab=lab)
                     if broker == "mosquitto" else AmqttBroker(lab=lab))
        h = Harness(spec, run, b)
        made.append(h)
        b.start()
        h.fed.ledger.add_process("broker", b.pid, b.scratch_dir)  # a killed test's broker is swept too
        return h

    yield make
    leftovers = []
    for h in made:
        leftovers += h.close()
    assert not leftovers, f"process groups still alive after stop_all: {leftovers}"
