"""A real federation (broker, server and device processes) and what it refuses on the wire.

* LeNet on digits over 5 semi-async rounds learns, on amqtt and on mosquitto.
* Bad frames published by a plain MQTT client on a device's update topic (garbage, truncated,
  oversized, wrong shape, wrong dtype, NaN, Inf, tampered body) are each refused with a reason
  in events.jsonl; the server keeps running, and the global model is exactly what the one legit
  update makes of it.
* Updates for an unknown task, from an unknown device and staler than the bound are refused
  with a reason; a redelivered update is counted once.

Fault tests on processes (kills, broker and server restarts) are in test_faults.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from runtime.chunks import CHUNK_MAGIC, CHUNK_VERSION, chunk_frame
from runtime.frames import FRAME_VERSION, encode_update
from runtime.protocol import SparseTensor

from .conftest import Harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Federate = Callable[..., Harness]
_PREFIX = struct.Struct("<4sBI")  # frame: magic, version, header length (runtime/frames.py)


def split_frame(frame: bytes) -> tuple[dict[str, Any], bytes]:
    _, _, header_len = _PREFIX.unpack_from(frame)
    return json.loads(frame[_PREFIX.size:_PREFIX.size + header_len]), frame[_PREFIX.size + header_len:]


def join_frame(header: dict[str, Any], body: bytes) -> bytes:
    """A frame from a (doctored) header and body, the body re-signed, so the only thing wrong
    with the frame is what the test changed."""
    header = {**header, "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest()}
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _PREFIX.pack(b"ORCH", FRAME_VERSION, len(raw)) + raw + body


def poke_value(frame: bytes, value: float) -> bytes:
    """The frame with the first float of its first tensor replaced, the body re-signed."""
    header, body = split_frame(frame)
    offset = header["tensors"][0]["offset"]
    return join_frame(header, body[:offset] + struct.pack("<f", value) + body[offset + 4:])


# ---------------------------------------------------------------- 1. it learns
@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", ["amqtt", "mosquitto"])
def test_three_devices_learn_lenet_on_digits(federation: Federate, broker: str) -> None:
    h = federation(broker, devices=3, rounds=5, partition="dirichlet:0.5", local_steps=20)
    h.start_warm()
    assert h.wait_server_exit(90) == 0
    rows = h.rows()
    assert [int(r["version"]) for r in rows] == [1, 2, 3, 4, 5]
    accuracy = [float(r["accuracy"]) for r in rows]
    assert max(accuracy[1:]) > accuracy[0] + 0.1, accuracy
    assert accuracy[-1] > accuracy[0], accuracy
    # Semi-async: K = ceil(0.5 x 3) = 2 updates close each round; everyone took part.
    # K = ceil(0.5 * 3) = 2, but a round may also close at its deadline with one slow device out.
    assert all(int(r["n_updates"]) >= 1 for r in rows) and sum(int(r["n_updates"]) for r in rows) >= 8
    assert {d for r in rows for d in r["devices"].split()} == {"dev0", "dev1", "dev2"}
    assert h.find("finished") and not h.find("update_rejected")


# ---------------------------------------------------------------- 2. bad frames
def tampered_in_transit(sealed: bytes) -> bytes:
    """The sealed frame with four body bytes zeroed, as a broker or a link could change them."""
    return sealed[:-40] + b"\0\0\0\0" + sealed[-36:]


def bad_payloads(fake: Any, task: Any) -> list[tuple[str, list[bytes], str]]:
    """(case, the MQTT payloads to publish, a piece of the reason the server must give)."""
    good = encode_update(fake.update(task, shift=0.5))
    header, body = split_frame(good)
    names = list(task.tensors)
    first = names[0]
    shape = task.tensors[first].shape

    def chunks(frame: bytes, tag: str) -> list[bytes]:
        # Sealed properly: what is wrong sits behind a valid MAC, so the frame checks are reached.
        return chunk_frame(fake.seal("update", frame), f"bad-{tag}")

    wrong_dtype = json.loads(json.dumps(header))
    wrong_dtype["tensors"][0]["dtype"] = "float16"  # says float16, encoding dense, bytes float32
    fp16_length = json.loads(json.dumps(header))
    fp16_length["tensors"][0].update(encoding="fp16", dtype="float16")  # 2-byte values, 4-byte length
    flat = fake.update(task, shift=0.5, **{first: task.tensors[first].reshape(-1)})
    bigger = fake.update(task, shift=0.5, **{first: np.zeros((shape[0] * 2, *shape[1:]), np.float32)})
    full = fake.update(task, shift=0.5)
    missing = dataclasses.replace(full, tensors={k: v for k, v in full.tensors.items() if k != names[-1]})
    extra = fake.update(task, shift=0.5, stowaway=np.zeros(3, np.float32))
    ident = b"huge"
    huge_len = 1 << 30  # announced 1 GiB: over the 512 MiB reassembly budget, refused before allocating
    oversized = struct.pack("<4sBBIIII", CHUNK_MAGIC, CHUNK_VERSION, len(ident), 0, 4096, huge_len,
                            zlib.crc32(b"x" * 64)) + ident + b"x" * 64
    cut = chunks(good, "cut")[0]
    return [
        ("unsealed frame", chunk_frame(good, "bad-unsealed"), "not sealed"),
        ("garbage bytes", [b"\x00\xffnot a chunk at all" * 8], "bad magic"),
        ("chunk shorter than its header", [cut[:12]], "truncated"),
        ("chunk with a damaged payload", [cut[:-40] + bytes(40)], "crc32 mismatch"),
        ("garbage inside a valid chunk", chunks(b"{not a frame}" * 20, "garbage"), "bad magic"),
        ("truncated frame", chunks(good[: len(good) // 2], "trunc"), "truncated"),
        ("oversized frame", [oversized], "exceeds the reassembly limit"),
        ("wrong dtype in the tensor table", chunks(join_frame(wrong_dtype, body), "dtype"), "dtype 'float16'"),
        ("fp16 entry whose length is float32", chunks(join_frame(fp16_length, body), "fp16"), "does not match fp16"),
        # Changed after sealing (in transit): the MAC, which covers every byte, refuses it. A body
        # that does not match its own header's sha256 but is sealed by the device's key is no
        # longer hashed again (runtime/frames.py): the MAC already vouches for what the device sent.
        ("tampered body", chunk_frame(tampered_in_transit(fake.seal("update", good)), "bad-tamper"), "bad MAC"),
        ("NaN value", chunks(poke_value(good, float("nan")), "nan"), "NaN"),
        ("Inf value", chunks(poke_value(good, float("inf")), "inf"), "Inf"),
        ("wrong shape (flattened)", chunks(encode_update(flat), "flat"), "layout expects"),
        ("oversized tensor", chunks(encode_update(bigger), "bigger"), "layout expects"),
        ("missing tensor", chunks(encode_update(missing), "missing"), "missing tensor"),
        ("unknown tensor", chunks(encode_update(extra), "extra"), "unknown tensor 'stowaway'"),
    ]


@pytest.mark.timeout(120)
def test_bad_frames_are_refused_and_never_touch_the_global_model(federation: Federate) -> None:
    # Fedavg waits for every task, and the only device the server knows at first is the fake
    # one: while it holds its task nothing legit can land, so the only traffic is the injection.
    h = federation(devices=2, rounds=3, strategy="fedavg")
    h.edit_server_toml("rounds", min_devices=1)
    h.start(devices=[])
    fake = h.fake("dev1")
    fake.hello()
    task = fake.next_task()
    init = np.load(h.run / "init.npy")
    np.testing.assert_array_equal(np.concatenate([t.reshape(-1) for t in task.tensors.values()]), init)

    cases = bad_payloads(fake, task)
    for case, payloads, reason in cases:
        mark = h.mark()
        for payload in payloads:
            fake.publish(payload)
        _, record = h.wait("update_rejected", after=mark, device="dev1")
        assert reason in record["reason"], f"{case}: {record['reason']}"
        assert h.fed.server is not None and h.fed.server.poll() is None, f"server died on {case}"
    assert not h.find("update_accepted") and h.rows() == []
    assert not (h.run / "checkpoint").exists()
    # Every payload that reassembled into a frame crossed the link: its bytes are counted (the
    # report's uplink), refused or not; broken chunks never became a frame.
    unframed = {"garbage bytes", "chunk shorter than its header", "chunk with a damaged payload", "oversized frame"}
    received = h.find("update_received")
    assert len(received) == len([c for c, _, _ in cases if c not in unframed])
    assert all(r["device"] == "dev1" and r["bytes"] > 0 for r in received)

    # The one legit update: the new global must be exactly the task's weights plus its shift,
    # which it would not be if any refused payload had reached the pending updates.
    shift = 0.01
    fake.send_update(fake.update(task, shift=shift))
    h.wait_version(1)
    version, global_flat = h.checkpoint_global()
    assert version == 1
    np.testing.assert_allclose(global_flat, init + np.float32(shift), rtol=0, atol=1e-6)
    row = h.rows()[0]
    assert (row["n_updates"], row["devices"], row["accepted_total"], row["rejected_total"]) == ("1", "dev1", "1",
                                                                                  str(len(cases)))

    # The fake leaves; a real device finishes the campaign, with more garbage arriving meanwhile.
    fake.status("offline")
    h.wait("device_offline", device="dev1")
    h.start_device("dev0")
    h.wait("task_sent", device="dev0")
    for payload in (b"junk" * 10, b"OCHK"):
        fake.publish(payload)
    assert h.wait_server_exit(60) == 0
    rows = h.rows()
    assert [r["devices"] for r in rows] == ["dev1", "dev0", "dev0"]
    accepted = h.find("update_accepted")
    assert [int(r["accepted_total"]) for r in rows] == [1, 2, 3] and len(accepted) == 3
    assert int(rows[-1]["rejected_total"]) == len(cases) + 2 == len(h.find("update_rejected"))
    assert all(r["reason"] for r in h.find("update_rejected"))


# ---------------------------------------------------------------- 3. refusals and redelivery
@pytest.mark.timeout(120)
def test_unknown_task_unknown_device_stale_refused_and_redelivery_counted_once(federation: Federate) -> None:
    # K=1: every update closes a round, so a real device moves the version on while the fake
    # one sits on an old task; max_staleness=1 makes a 2-version-old base too stale.
    # dev0's tasks are long (1500 steps, ~0.5 s alone, seconds on a loaded host) so the fake's
    # message exchanges below, a few ms each, finish before dev0 moves the version at all.
    h = federation(devices=2, rounds=12, local_steps=1500,
                   strategy_params={"k": 1, "max_staleness": 1})
    h.start(devices=["dev0"])
    fake = h.fake("dev1")
    fake.hello()
    first = fake.next_task()

    # Unknown device: a well-formed update on the topic of an id off the roster, with no key (sent
    # by an insider who can publish there; a device's own login cannot, see tests/security).
    ghost = h.fake("ghost")
    mark = h.mark()
    ghost.send_update(ghost.update(first))
    _, record = h.wait("update_rejected", after=mark, device="ghost")
    assert "not on the roster" in record["reason"]  # a campaign lists its devices (server/config.py roster)
    # Unknown task: a registered device answering a task it was never given.
    mark = h.mark()
    fake.send_update(dataclasses.replace(fake.update(first), task_id="t999"))
    _, record = h.wait("update_rejected", after=mark, device="dev1")
    assert "unknown task" in record["reason"] and "t999" in record["reason"]

    # Redelivery: the same frame again under the same chunk id is swallowed by the reassembler;
    # under a new chunk id (a re-send whose receipt was lost) it is answered with the first
    # receipt again and never reaches the engine: counted once, refused by nobody.
    mark = h.mark()
    frame = fake.send_update(fake.update(first, shift=0.01), msg_id="first-send")
    fake.send_frame(frame, msg_id="first-send")
    fake.send_frame(frame, msg_id="second-send")
    h.wait("update_repeated", after=mark, device="dev1", task_id=first.task_id)
    assert len(h.find("update_accepted", after=mark, device="dev1")) == 1
    assert not h.find("update_rejected", after=mark, device="dev1")
    assert len(h.find("receipt_sent", after=mark, device="dev1", task_id=first.task_id, accepted=True)) == 2

    # Stale: take the next task, let the real device publish two more versions, then answer.
    second = fake.next_task()
    h.wait_version(second.base_version + 2)
    mark = h.mark()
    fake.send_update(fake.update(second))
    _, record = h.wait("update_rejected", after=mark, device="dev1", task_id=second.task_id)
    assert "too stale" in record["reason"] and "max_staleness 1" in record["reason"]

    assert h.wait_server_exit(60) == 0
    rows = h.rows()
    assert [int(r["version"]) for r in rows] == list(range(1, 13))
    # The fake's one accepted update is in exactly one aggregation.
    assert sum(r["devices"].split().count("dev1") for r in rows) == 1
    assert int(rows[-1]["accepted_total"]) == sum(int(r["n_updates"]) for r in rows)


def test_sparse_weights_update_is_reconstructed_from_the_base_model(federation: Federate) -> None:
    """A top-k upload (SparseTensor) moves only the coordinates it sent; the rest keep the global
    value (methods.md §5.3). The server no longer densifies it: the merge sees the sent indices.
    It once reached `ParamLayout.join` as an object and crashed the server."""
    h = federation(devices=2, rounds=1, strategy="fedavg")
    h.edit_server_toml("rounds", min_devices=1)  # the fake is the only device: its update is the round
    h.start(devices=[])
    fake = h.fake("dev1")
    fake.hello()
    task = fake.next_task()
    init = np.load(h.run / "init.npy")
    first = next(iter(task.tensors))
    dense = np.asarray(task.tensors[first], np.float32)
    picked = np.arange(0, dense.size, 3, dtype=np.int64)
    values = dense.reshape(-1)[picked] + np.float32(0.5)
    sparse = SparseTensor(shape=dense.shape, indices=picked, values=values.astype(np.float32))
    fake.send_update(fake.update(task, **{first: sparse}))
    h.wait_version(1)
    _, global_flat = h.checkpoint_global()
    expected = init.copy()
    expected[picked] += np.float32(0.5)  # the first tensor starts at offset 0 of the flat buffer
    np.testing.assert_allclose(global_flat, expected, rtol=0, atol=1e-6)
    assert h.wait_server_exit(60) == 0
