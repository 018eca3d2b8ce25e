"""Streaming seal and open (runtime/chunks.py `chunk_sealed`, `Reassembler.feed(mac_key=)`,
runtime/seal.py `MacStream`): the same bytes on the wire as seal-then-chunk, the MAC computed
chunk by chunk on both ends, and every refusal of the whole-frame MAC kept: a bad MAC, a replay,
a truncated, reordered or duplicated frame."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import zlib

import pytest

from runtime.chunks import FrameBuffer, Reassembler, chunk_frame, chunk_sealed
from runtime.errors import ProtocolError
from runtime.outbox import Outbox
from runtime.seal import MAC_BYTES, open_sealed, seal

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
SEALING = {"key": KEY, "run_id": "runA", "device_id": "dev0", "kind": "update"}
_HEAD = struct.Struct("<4sBBIIII")


def sealed_chunks(payload: bytes, chunk_bytes: int, msg_id: str = "m1", **kw: object) -> list[bytes]:
    return list(chunk_sealed(payload, **{**SEALING, **kw}, msg_id=msg_id, chunk_bytes=chunk_bytes))  # type: ignore[arg-type]


def receive(chunks: list[bytes], mac_key: bytes | None = KEY) -> memoryview:
    r = Reassembler(timeout_s=60, max_bytes=1 << 26, clock=lambda: 0.0)
    frames = [f for f in (r.feed("dev0", c, mac_key=mac_key) for c in chunks) if f is not None]
    assert len(frames) == 1
    return frames[0]


def opened(frame: memoryview, **kw: object) -> memoryview:
    return open_sealed(frame, **{**SEALING, **kw}).payload  # type: ignore[arg-type]


def with_payload_byte_flipped(chunk: bytes, at: int) -> bytes:
    """The chunk with one payload byte flipped and its CRC-32 fixed: damage only the MAC can see."""
    start = _HEAD.size + chunk[5]
    body = bytearray(chunk[start:])
    body[at] ^= 1
    magic, version, id_len, index, total, frame_len, _crc = _HEAD.unpack_from(chunk)
    head = _HEAD.pack(magic, version, id_len, index, total, frame_len, zlib.crc32(body))
    return head + chunk[_HEAD.size:start] + bytes(body)


@pytest.mark.parametrize("n_bytes, chunk_bytes", [(1, 4096), (300, 4096), (10_000, 1000), (4096 * 3 - 70, 4096),
                                                  (4096 * 3 - 40, 4096), (4096 * 3 - 20, 4096), (100_003, 65536)])
def test_sealed_chunks_are_the_chunks_of_the_sealed_frame(n_bytes: int, chunk_bytes: int) -> None:
    # (4096 x 3 - 40 and - 20 put the MAC across the boundary of the last two chunks, and alone in the last.)
    payload = os.urandom(n_bytes)
    assert sealed_chunks(payload, chunk_bytes) == chunk_frame(seal(payload, **SEALING), "m1", chunk_bytes)  # type: ignore[arg-type]


def test_the_receiver_computes_the_mac_as_chunks_come_and_open_only_compares_it() -> None:
    payload = os.urandom(50_000)
    frame = receive(sealed_chunks(payload, 4096))
    owner = frame.obj
    assert isinstance(owner, FrameBuffer) and owner.mac is not None
    assert owner.mac.digest() == hmac.new(KEY, bytes(frame[:-MAC_BYTES]), hashlib.sha256).digest()
    assert bytes(opened(frame)) == payload
    assert owner.mac is None  # taken once: a second open hashes the buffer afresh
    assert bytes(opened(frame)) == payload


def test_chunks_out_of_order_and_duplicated_still_open() -> None:
    payload = os.urandom(50_000)
    chunks = sealed_chunks(payload, 4096)
    shuffled = chunks[::-1] + chunks[3:5]  # all backwards (each waits for the gap), then two again
    r = Reassembler(timeout_s=60, max_bytes=1 << 26, clock=lambda: 0.0)
    frames = [f for f in (r.feed("dev0", c, mac_key=KEY) for c in shuffled) if f is not None]
    assert len(frames) == 1 and bytes(opened(frames[0])) == payload


def test_a_bad_mac_is_refused_whatever_chunk_was_damaged() -> None:
    payload = os.urandom(50_000)
    for index, at in ((0, 30), (5, 100), (-1, -1)):  # seal header, body, the MAC itself
        chunks = sealed_chunks(payload, 4096)
        chunks[index] = with_payload_byte_flipped(chunks[index], at)
        with pytest.raises(ProtocolError, match="bad MAC: not sealed under dev0's key"):
            opened(receive(chunks))


def test_the_mac_under_another_key_is_never_taken() -> None:
    payload = os.urandom(20_000)
    frame = receive(sealed_chunks(payload, 4096), mac_key=OTHER)  # fed with the wrong key: recomputed
    assert bytes(opened(frame)) == payload
    with pytest.raises(ProtocolError, match="bad MAC"):  # sealed under another device's key
        opened(receive(sealed_chunks(payload, 4096, key=OTHER)))


def test_a_replay_from_another_run_device_or_kind_is_refused() -> None:
    payload = os.urandom(20_000)
    with pytest.raises(ProtocolError, match=r"sealed for run 'runB', this is run 'runA' \(a replay"):
        opened(receive(sealed_chunks(payload, 4096, run_id="runB")))
    with pytest.raises(ProtocolError, match="sealed for device 'dev1'"):
        opened(receive(sealed_chunks(payload, 4096, device_id="dev1")))
    with pytest.raises(ProtocolError, match="sealed as a 'task' message"):
        opened(receive(sealed_chunks(payload, 4096, kind="task")))


def test_a_truncated_frame_never_opens_and_expires_with_its_missing_chunks() -> None:
    chunks = sealed_chunks(os.urandom(20_000), 4096)
    now = [0.0]
    r = Reassembler(timeout_s=5, max_bytes=1 << 26, clock=lambda: now[0])
    assert [r.feed("dev0", c, mac_key=KEY) for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    now[0] = 10.0
    (reason,) = r.expire()
    assert f"{len(chunks) - 1} of {len(chunks)} chunks" in reason and f"missing [{len(chunks) - 1}]" in reason
    cut = bytes(receive(chunk_frame(seal(os.urandom(20_000), **SEALING)[:-1], "m2", 4096)))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="bad MAC"):  # a frame that lost its last byte before chunking
        open_sealed(cut, **SEALING)  # type: ignore[arg-type]


def test_a_duplicate_with_other_content_drops_the_frame() -> None:
    chunks = sealed_chunks(os.urandom(20_000), 4096)
    r = Reassembler(timeout_s=60, max_bytes=1 << 26, clock=lambda: 0.0)
    r.feed("dev0", chunks[0], mac_key=KEY)
    with pytest.raises(ProtocolError, match="duplicate with different content"):
        r.feed("dev0", with_payload_byte_flipped(chunks[0], 200), mac_key=KEY)


def test_bad_arguments_raise_before_the_first_chunk() -> None:
    with pytest.raises(ProtocolError, match="at least 32 bytes"):
        chunk_sealed(b"x", key=b"short", run_id="r", device_id="d", kind="update", msg_id="m1")
    with pytest.raises(ProtocolError, match="msg_id"):
        chunk_sealed(b"x", **SEALING, msg_id="bad id")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="kind must be one of"):
        chunk_sealed(b"x", key=KEY, run_id="r", device_id="d", kind="server_state", msg_id="m1")


def test_the_outbox_seals_as_it_chunks_and_every_send_opens() -> None:
    sent: list[bytes] = []
    box = Outbox(sent.append, chunk_bytes=4096,
                 chunks=lambda frame, msg_id, size: chunk_sealed(frame, **SEALING, msg_id=msg_id,  # type: ignore[arg-type]
                                                                 chunk_bytes=size))
    payload = os.urandom(30_000)
    box.add("t1", payload)
    box.send("t1")
    box.send("t1")  # a re-send: sealed again, the same envelope under a new msg_id
    r = Reassembler(timeout_s=60, max_bytes=1 << 26, clock=lambda: 0.0)
    frames = [f for f in (r.feed("dev0", c, mac_key=KEY) for c in sent) if f is not None]
    assert [bytes(opened(f)) for f in frames] == [payload, payload]
    assert bytes(frames[0]) == bytes(frames[1]) == seal(payload, **SEALING)  # type: ignore[arg-type]
