"""A hostile client on a real broker, next to a working federation (two real devices training
LeNet, the server, amqtt or mosquitto). Each attack is one the issue measured; each test asserts it
ends refused or bounded while the real devices' rounds go on. Figures: README "Robustness"."""

from __future__ import annotations

import json
import random
import time
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from runtime.chunks import _CHUNK, CHUNK_MAGIC, CHUNK_VERSION, chunk_frame
from runtime.frames import decode_task, encode_update
from runtime.mqtt import MqttClient, MqttConfig
from runtime.protocol import Hello, Status, Task, Telemetry, TelemetrySample, Topics, encode_json
from runtime.seal import open_sealed
from tests.integration.conftest import Harness, federation  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration
Federate = Callable[..., Harness]
FLOOD_FRAME = 64 * 1024 * 1024


def attacker(h: Harness) -> MqttClient:
    # An insider the broker lets publish anywhere under the root (the server's login): the brokers'
    # ACLs stop a device's own login earlier (tests/security/test_auth_brokers.py).
    login, ca = h.lab.server, str(h.lab.tls.ca_file) if h.lab.tls else None
    client = MqttClient(h.broker.url, MqttConfig(f"attacker-{uuid.uuid4().hex[:6]}", keepalive_s=10,
                                                 username=login.username, password=login.password, ca_file=ca))
    client.connect()
    return client


def first_chunk(msg_id: str, frame_len: int = FLOOD_FRAME) -> bytes:
    # A well-formed first chunk (an even split of 64-byte chunks), so the quota has to stop it:
    # the reassembler refuses a chunk that fits no even split at once.
    payload, ident = b"\0" * 64, msg_id.encode()
    head = _CHUNK.pack(CHUNK_MAGIC, CHUNK_VERSION, len(ident), 0, frame_len // 64, frame_len, zlib.crc32(payload))
    return head + ident + payload


def hello_bytes(device_id: str, **kw: Any) -> bytes:
    fields: dict[str, Any] = {"board": "fake", "cores": 1.0, "ram_mb": 1024, "runtime_version": "x",
                              "profiles": ("dense",), "n_samples": 50, "label_histogram": (), **kw}
    return encode_json(Hello(device_id=device_id, **fields))


def versions_during(h: Harness, seconds: float, act: Callable[[], None] | None = None) -> int:
    start = max(h.versions() or [0])
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if act is not None:
            act()
        else:
            time.sleep(0.05)
    return max(h.versions() or [0]) - start


def test_flood_bloat_bomb_sybils_and_descriptors_leave_the_rounds_going(federation: Federate) -> None:  # noqa: F811
    h = federation(devices=3, rounds=100_000, strategy_params={"k": 1}, local_steps=10, time_limit_s=300.0)
    h.start(devices=["dev0", "dev1"])
    evil = h.fake("dev2")  # on the roster, said hello: an authenticated but malicious device
    evil.hello()
    h.wait_version(2, timeout_s=60)
    topics, client = Topics(h.root), attacker(h)
    server = psutil.Process(h.fed.server.pid)  # type: ignore[union-attr]
    rss_before = server.memory_info().rss
    clean = versions_during(h, 6.0)

    # Flood: ~300 first chunks a second announcing 64 MiB frames, on the malicious device's own
    # topic and on made-up ids'. Before: 12 aggregations in 15 s became 1.
    sent = {"n": 0}

    def flood() -> None:
        for _ in range(15):
            i = sent["n"] = sent["n"] + 1
            topic = topics.update("dev2") if i % 2 else topics.update(f"sybil{i % 500}")
            client.publish(topic, first_chunk(f"f{i}"), qos=0)
        time.sleep(0.05)

    mark = h.mark()
    flooded = versions_during(h, 6.0, flood)
    assert sent["n"] >= 900
    assert flooded >= max(2, 0.3 * clean), f"{flooded} versions in 6 s under the flood, {clean} before it"
    evicted = h.find("frame_rejected", after=mark) + h.find("update_rejected", after=mark)
    assert any("over its sender's quota" in r["reason"] or "over the limit" in r["reason"] for r in evicted)
    assert not h.find("update_rejected", after=mark, device="dev0")

    # Hello bloat: 30 hellos of 1 MiB (before: state.json reached 115 MB, rounds took 40-52 s).
    for _ in range(30):
        client.publish(topics.hello("dev2"),
                       evil.seal("hello", hello_bytes("dev2", artifacts=tuple("k" * 1000 for _ in range(1000)))),
                       qos=1, wait_s=10)
    # Profile bomb (before: 1.6 GB), then a spoofed OOM that makes the server parse it.
    bomb = hello_bytes("dev2", profiles=("dense", "classes=0-20000000"))
    client.publish(topics.hello("dev2"), evil.seal("hello", bomb), qos=1)
    task = evil.next_task()
    oom = Status("dev2", "failed", time.time(), task.task_id, "killed (exit 137, OOM)", "oom")
    client.publish(topics.status("dev2"), evil.seal("status", encode_json(oom)), qos=1, wait_s=10)
    # Sybils and descriptors: 200 hellos and 1,100 telemetry batches from made-up ids (before:
    # 37.7 MB published to sybils; 1,016 ids exhausted the descriptors).
    sample = TelemetrySample(time.time(), "idle", 1.0, 1.0, 1.0, None, None, None, None)
    for i in range(200):
        client.publish(topics.hello(f"sybil{i}"), hello_bytes(f"sybil{i}"), qos=0)
    for i in range(1100):
        client.publish(topics.telemetry(f"ghost{i}"), encode_json(Telemetry(f"ghost{i}", "model", (sample,))), qos=0)
    mark2 = h.mark()
    after = versions_during(h, 6.0)

    assert server.is_running() and h.fed.server.poll() is None  # type: ignore[union-attr]
    assert after >= max(2, 0.3 * clean), f"{after} versions in 6 s after the attacks, {clean} before"
    records = h.events.refresh()
    rejected_hellos = [r for r in records[mark:] if r["event"] == "hello_rejected" and r["device"] == "dev2"]
    assert rejected_hellos and all("exceeds the limit of 32768" in r["reason"] or "more than" in r["reason"]
                                   for r in rejected_hellos)
    assert not [r for r in records if r["event"] in ("task_frame", "artifact_sent") and
                str(r.get("device", "")).startswith("sybil")]
    assert not [p for p in (h.run / "devices").iterdir() if p.name.startswith("ghost")]
    assert len(server.open_files()) < 100
    assert (h.run / "checkpoint" / "state.json").stat().st_size < 100_000
    assert server.memory_info().rss - rss_before < 300 * 1024 * 1024
    # Thousands of bad messages, a bounded number of log lines (the rest are counted).
    kinds: dict[str, int] = {}
    for r in records[mark:]:
        kinds[r["event"]] = kinds.get(r["event"], 0) + 1
    logged = sum(n for k, n in kinds.items() if k.endswith("_rejected"))
    assert logged < 600, f"{logged} rejections logged for ~4,300 bad messages: {kinds}"
    assert h.find("aggregated", after=mark2)
    print(json.dumps({"versions_6s_clean": clean, "versions_6s_flood": flooded, "versions_6s_after": after,
                      "flood_chunks": sent["n"], "rejections_logged": logged,
                      "server_rss_growth_mb": round((server.memory_info().rss - rss_before) / 2**20, 1)}))


def latest_task(fake: Any, task: Task, quiet_s: float = 1.5) -> Task:
    """The last task the fake device was sent, once nothing has arrived for `quiet_s`."""
    deadline = time.monotonic() + quiet_s
    while time.monotonic() < deadline:
        msg = fake._next(0.1)
        if msg is None:
            continue
        frame = fake.reassembler.feed(msg.topic, msg.payload)
        if frame is not None and msg.topic.endswith("/task"):
            opened = open_sealed(frame, key=fake.key, run_id=fake.run_id, device_id=fake.device_id, kind="task")
            task, deadline = decode_task(opened.payload, source="server"), time.monotonic() + quiet_s
    return task


def mutate(rng: random.Random, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        if op < 0.4 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op < 0.6:
            data = data[:rng.randrange(len(data) + 1)]
        elif op < 0.8:
            data[rng.randrange(len(data) + 1):0] = rng.randbytes(rng.randint(1, 64))
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 300)))
    return bytes(data)


def test_ten_thousand_mutated_messages_on_a_devices_own_topics_change_nothing(
        federation: Federate) -> None:  # noqa: F811
    """The device-topic fuzz on mosquitto: hello, status, telemetry and update payloads of a
    registered device, mutated; the server survives, no update is accepted, the model stays at
    version 0, and a valid update afterwards is merged."""
    h = federation("mosquitto", devices=1, rounds=1, strategy="fedavg", time_limit_s=300.0)
    h.start(devices=[])
    fake = h.fake("dev0")
    fake.hello()
    task = fake.next_task()
    topics, client, rng = Topics(h.root), attacker(h), random.Random(15)
    frame = encode_update(fake.update(task, shift=0.01))
    # Sealed as the real device's would be: a mutation breaks the MAC (or the chunk's CRC).
    seeds = {
        "hello": fake.seal("hello", hello_bytes("dev0")),
        "status": fake.seal("status", encode_json(Status("dev0", "training", time.time(), task.task_id))),
        "telemetry": fake.seal("telemetry", encode_json(Telemetry("dev0", "model", (
            TelemetrySample(time.time(), "idle", 1.0, 1.0, 1.0, None, None, None, None),)))),
        "update": chunk_frame(fake.seal("update", frame), "seed")[0],
    }
    for i in range(10_000):
        kind = rng.choice(sorted(seeds))
        payload = mutate(rng, seeds[kind])
        while payload == seeds[kind]:  # a cut at the very end changes nothing: a valid message
            payload = mutate(rng, seeds[kind])
        client.publish(f"{h.root}/dev/dev0/{kind}", payload, qos=0)
        if i % 500 == 499:
            time.sleep(0.05)  # let the broker drain (QoS 0 floods are dropped, not refused)
    client.publish(topics.status("dev0"), fake.seal("status", encode_json(Status("dev0", "idle", time.time()))), qos=1,
                   wait_s=10)
    time.sleep(1.0)
    assert h.fed.server.poll() is None, h.diagnose()  # type: ignore[union-attr]
    assert not h.find("update_accepted") and not h.find("aggregated")
    latest = latest_task(fake, task)  # a mutated "failed"/"offline" status may have re-issued it
    fake.send_update(fake.update(latest, shift=0.01))
    h.wait("update_accepted", device="dev0")
    assert h.wait_server_exit(60) == 0 and h.versions() == [1]
