"""Attacks behind the broker's ACLs (issue 15, part 2): what the sealed messages hold even on a
broker whose accounts Orchard does not control. The attacker here has the run of the campaign's
topics (it logs in as the server would, so the broker lets everything through), but not the
devices' keys. A real server and real devices; each attack is refused with its reason, and the
global model is exactly what the legitimate updates make of it.

* Server side: a poisoned update replayed from an earlier run (its own keys), one sealed for
  another run under this lab's key (a lab whose keys persist), one forged under a made-up key,
  another device's message, a task replayed as an update, an unsealed frame, and a forged
  retained "offline" status.
* Device side: a forged 40,000-step task, a real task replayed, a task of another run, and a
  retained forged artifact under the real key: the device runs none of them and finishes every
  real task.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from runtime.chunks import Reassembler, chunk_frame
from runtime.frames import decode_task, encode_artifact, encode_task, encode_update
from runtime.mqtt import Message, MqttClient, MqttConfig
from runtime.protocol import Artifact, Status, Topics, encode_json
from runtime.seal import open_sealed, seal
from testbed.lab_secrets import provision
from tests.integration.conftest import Harness, federation  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def insider(h: Harness) -> MqttClient:
    ca = str(h.lab.tls.ca_file) if h.lab.tls else None
    c = MqttClient(h.broker.url, MqttConfig(f"intruder-{uuid.uuid4().hex[:6]}", username=h.lab.server.username,
                                            password=h.lab.server.password, ca_file=ca))
    c.connect()
    return c


@pytest.mark.timeout(120)
def test_forged_and_replayed_updates_are_refused_and_the_model_is_unchanged(federation, tmp_path: Path) -> None:  # noqa: F811
    earlier = provision(tmp_path / "earlier-run", "orchard/earlier", ["dev0", "dev1"])  # the same campaign, run before
    h = federation(devices=2, rounds=1, strategy="fedavg")
    h.edit_server_toml("rounds", min_devices=1)
    h.start(devices=[])
    fake = h.fake("dev1")
    fake.hello()
    task = fake.next_task()
    init = np.load(h.run / "init.npy")
    poisoned = encode_update(fake.update(task, shift=100.0))
    own, other = h.lab.devices["dev1"].hmac_key, h.lab.devices["dev0"].hmac_key
    old = earlier.devices["dev1"].hmac_key
    assert own and other and old

    def sealed(key: bytes, run_id: str = h.lab.run_id, device_id: str = "dev1", kind: str = "update") -> bytes:
        return seal(poisoned, key=key, run_id=run_id, device_id=device_id, kind=kind)

    cases = [
        ("replay from an earlier run", sealed(old, run_id=earlier.run_id), "bad MAC"),
        ("another run under this lab's key", sealed(own, run_id=earlier.run_id), "a replay from another run"),
        ("forged under a made-up key", sealed(os.urandom(32)), "bad MAC"),
        ("another device's message", sealed(other, device_id="dev0"), "bad MAC"),
        ("a task replayed as an update", sealed(own, kind="task"), "sealed as a 'task' message"),
        ("unsealed", poisoned, "not sealed"),
    ]
    for case, payload, reason in cases:
        mark = h.mark()
        fake.send_frame(payload, sealed=False)
        _, record = h.wait("update_rejected", after=mark, device="dev1")
        assert reason in record["reason"], (case, record["reason"])
    # A forged retained "offline" status (it once cancelled a device's work): refused, task kept.
    status = encode_json(Status("dev1", "offline", time.time(), detail="forged"))
    mark = h.mark()
    fake.client.publish(fake.topics.status("dev1"), seal(status, key=os.urandom(32), run_id=h.lab.run_id,
                                                        device_id="dev1", kind="status"), qos=1, retain=True, wait_s=5)
    _, record = h.wait("status_rejected", after=mark, device="dev1")
    assert "bad MAC" in record["reason"] and not h.find("device_offline") and not h.find("task_abandoned")
    fake.status("idle")  # the real device's own status replaces the retained forgery
    assert not h.find("update_accepted") and not (h.run / "checkpoint").exists()  # the model is untouched
    fake.send_update(fake.update(task, shift=0.01))
    h.wait_version(1)
    _, global_flat = h.checkpoint_global()
    np.testing.assert_allclose(global_flat, init + np.float32(0.01), rtol=0, atol=1e-6)
    assert h.wait_server_exit(60) == 0
    assert int(h.rows()[-1]["rejected_total"]) == len(cases) + 1  # the updates and the status


@pytest.mark.timeout(150)
def test_a_device_refuses_forged_replayed_and_foreign_tasks_and_artifacts(federation, tmp_path: Path) -> None:  # noqa: F811
    earlier = provision(tmp_path / "earlier-run", "orchard/earlier", ["dev0"])
    h = federation(devices=1, rounds=3, strategy="fedavg", local_steps=20)
    t = Topics(h.root)
    spy = insider(h)
    spy.subscribe(t.task("dev0"))
    h.start()
    key = h.lab.devices["dev0"].hmac_key
    assert key is not None
    # Capture the first real task off the wire, sealed as the server sent it.
    reassembler = Reassembler(timeout_s=30, max_bytes=64 << 20)
    deadline, captured = time.monotonic() + 30, None
    while captured is None and time.monotonic() < deadline:
        ev = spy.get(0.5)
        if isinstance(ev, Message):
            captured = reassembler.feed(ev.topic, ev.payload)
    assert captured is not None, "no task seen on the wire"
    real = decode_task(open_sealed(captured, key=key, run_id=h.lab.run_id, device_id="dev0", kind="task").payload)
    h.wait("update_accepted", device="dev0", task_id=real.task_id)

    long_task = encode_task(dataclasses.replace(real, task_id="forged-1", local_steps=40_000))
    artifact = encode_artifact(Artifact(real.assignment.primary_key, {"manifest.json": b"{}"}))
    earlier_key = earlier.devices["dev0"].hmac_key
    assert earlier_key is not None
    attacks = [
        (t.task("dev0"), seal(long_task, key=os.urandom(32), run_id=h.lab.run_id, device_id="dev0", kind="task"),
         False, "bad MAC"),
        (t.task("dev0"), seal(long_task, key=earlier_key, run_id=earlier.run_id, device_id="dev0", kind="task"),
         False, "bad MAC"),
        (t.task("dev0"), captured, False, "already received (a replay)"),
        (t.artifact("dev0"), seal(artifact, key=os.urandom(32), run_id=h.lab.run_id, device_id="dev0",
                                  kind="artifact"), True, "bad MAC"),
    ]
    for topic, frame, retain, _ in attacks:
        for chunk in chunk_frame(frame, uuid.uuid4().hex):
            spy.publish(topic, chunk, qos=1, retain=retain, wait_s=5)
    assert h.wait_server_exit(90) == 0
    spy.publish(t.artifact("dev0"), b"", qos=1, retain=True, wait_s=5)  # clear the retained forgery
    spy.close()
    assert h.versions() == [1, 2, 3]
    accepted = h.find("update_accepted", device="dev0")
    assert len(accepted) == 3 and all(a["task_id"] != "forged-1" for a in accepted)
    assert len({a["task_id"] for a in accepted}) == 3  # the replayed task was not trained twice
    assert not h.find("update_rejected") and not h.find("task_abandoned")
    assert not [s for s in h.find("device_status", device="dev0") if s["state"] == "failed"]
    dropped = [line for line in (h.run / "logs" / "dev0.log").read_text().splitlines() if "dropped message" in line]
    for topic, _, _, reason in attacks:
        want = sum(1 for a in attacks if (a[0], a[3]) == (topic, reason))
        got = [line for line in dropped if f"on {topic}:" in line and reason in line]
        assert len(got) >= want, (topic, reason, dropped)
