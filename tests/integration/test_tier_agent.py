"""Tier by resources in a real agent over a real broker: its hello lists its choice first, its
status says why, and a measured task that does not fit its memory cap moves it down a tier
(announced again), with the measurement kept on disk for the next start."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from runtime.agent import Agent
from runtime.device_config import DeviceConfig
from runtime.mqtt import Message, MqttClient, MqttConfig
from runtime.protocol import Assignment, Hello, Status, Task, Topics, decode_json
from runtime.seal import open_sealed
from testbed.broker import AmqttBroker
from testbed.lab_secrets import provision

TIERS = ("dense", "keep=0.5,depth=0.67", "keep=0.25,depth=0.34")


def _next(client: MqttClient, topic_end: str, key: bytes, run_id: str) -> bytes:
    """The next message on */`topic_end`, opened as the server opens it (sealed by d0)."""
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        msg = client.get(1.0)
        if isinstance(msg, Message) and msg.topic.endswith(topic_end) and msg.payload != b"offline":
            return open_sealed(msg.payload, key=key, run_id=run_id, device_id="d0", kind=topic_end.strip("/")).payload
    raise AssertionError(f"no message on */{topic_end}")


@pytest.mark.timeout(90)
def test_the_agent_tiers_itself_by_what_it_measured(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "shard.npz", x=rng.normal(size=(20, 1, 8, 8)).astype(np.float32),
             y=rng.integers(0, 10, 20).astype(np.int64))
    root = f"orchard/t{uuid.uuid4().hex[:6]}"
    lab = provision(tmp_path, root, ["d0"])  # the broker's logins and ACLs, d0's key
    broker = AmqttBroker(lab=lab).start()
    cfg = DeviceConfig(device_id="d0", board="rpi4b-4gb", shard=tmp_path / "shard.npz",
                       artifact_cache=tmp_path / "cache" / "d0", profiles=TIERS, broker_url=broker.url, root=root,
                       credentials=lab.device_file("d0"), run_id=lab.run_id, tier="by-resources")
    key = lab.devices["d0"].hmac_key
    assert key is not None
    watcher = MqttClient(broker.url, MqttConfig(f"watch-{uuid.uuid4().hex[:6]}", keepalive_s=5,
                                                username=lab.server.username, password=lab.server.password))
    agent = Agent(cfg)
    try:
        watcher.connect()
        topics = Topics(root)
        watcher.subscribe(topics.hello("d0"), qos=1)
        watcher.subscribe(topics.status("d0"), qos=1)
        agent.mqtt.connect()
        agent.greeted = True
        agent._announce()
        hello = decode_json(Hello, _next(watcher, "/hello", key, lab.run_id), source="d0")
        status = decode_json(Status, _next(watcher, "/status", key, lab.run_id), source="d0")
        assert hello.profiles[0] == "dense" and "dense: not measured yet" in status.detail
        task = Task("t1", 0, 0, "m", Assignment("cos2p", "dense", ("k",), {}), 25, 0, 0.05, 32, 30.0)
        cap = agent.sampler.limits.mem_limit_mb() or float(agent.board.ram_mb)
        agent._measure_tier(task, peak_rss_mb=cap, step_ms=40.0, cores=1.0)  # all of the cap: too big
        hello = decode_json(Hello, _next(watcher, "/hello", key, lab.run_id), source="d0")
        status = decode_json(Status, _next(watcher, "/status", key, lab.run_id), source="d0")
        assert hello.profiles == (TIERS[1], TIERS[0], TIERS[2])
        assert f"tier {TIERS[1]} by resources" in status.detail and "too big: dense: peak" in status.detail
        assert "dense" in (tmp_path / "cache" / "d0.state" / "tiers.json").read_text()
    finally:
        agent.trainer.close()
        agent.mqtt.close()
        watcher.close()
        broker.close()
