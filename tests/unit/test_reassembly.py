"""Chunking and reassembly: splits, duplicates, expiry, bounded memory and chunk rejections."""
from __future__ import annotations

import struct

import pytest

from runtime.chunks import CHUNK_VERSION, Reassembler, chunk_frame
from runtime.errors import ProtocolError
from tests.unit.protocol_samples import (
    rejects,
    task_frame,
    update_frame,
)


# ---------------------------------------------------------------- chunking
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_single_chunk_for_small_frames_and_exact_split() -> None:
    frame = update_frame()
    assert len(chunk_frame(frame, "m")) == 1
    assert len(chunk_frame(frame, "m", chunk_bytes=len(frame))) == 1
    assert len(chunk_frame(frame, "m", chunk_bytes=len(frame) - 1)) == 2
    r = Reassembler(timeout_s=5, max_bytes=1 << 20)
    assert r.feed("dev3", chunk_frame(frame, "m")[0]) == frame


def test_duplicate_chunks_count_once() -> None:
    frame = task_frame()
    chunks = chunk_frame(frame, "m1", chunk_bytes=100)
    r = Reassembler(timeout_s=5, max_bytes=1 << 20, clock=FakeClock())
    assert r.feed("dev3", chunks[0]) is None
    assert r.feed("dev3", chunks[0]) is None  # duplicate mid-way: ignored
    results = [r.feed("dev3", c) for c in chunks[1:]]
    assert results.count(frame) == 1
    assert all(r.feed("dev3", c) is None for c in chunks)  # QoS-1 redelivery after completion: ignored
    assert r.pending_bytes == 0 and r.expire() == []
    # The same msg id from another sender is a different message.
    assert [r.feed("dev4", c) for c in chunks][-1] == frame


def test_missing_chunk_expires_with_reason() -> None:
    clock = FakeClock()
    frame = task_frame()
    chunks = chunk_frame(frame, "m1", chunk_bytes=100)
    r = Reassembler(timeout_s=30, max_bytes=1 << 20, clock=clock)
    for c in chunks[:2] + chunks[3:]:
        assert r.feed("dev3", c) is None
    clock.now += 30
    assert r.expire() == []  # not older than the timeout yet
    clock.now += 0.5
    (reason,) = r.expire()
    assert reason == (
        f"dropped frame 'm1' from dev3: {len(chunks) - 1} of {len(chunks)} chunks after 30.5 s "
        "(timeout 30 s), missing [2]"
    )
    assert r.pending_bytes == 0
    assert r.feed("dev3", chunks[2]) is None  # the late chunk starts a fresh partial, never a bad frame


def test_completed_ids_are_forgotten_after_the_timeout() -> None:
    clock = FakeClock()
    chunk = chunk_frame(update_frame(), "m1")[0]
    r = Reassembler(timeout_s=10, max_bytes=1 << 20, clock=clock)
    assert r.feed("dev3", chunk) is not None
    assert r.feed("dev3", chunk) is None
    clock.now += 11
    r.expire()
    assert r.feed("dev3", chunk) is not None


def test_memory_is_bounded_by_evicting_the_oldest_partial() -> None:
    frame = task_frame()  # ~1 KB
    a, b = chunk_frame(frame, "a", 100), chunk_frame(frame, "b", 100)
    r = Reassembler(timeout_s=10, max_bytes=len(frame) + 10, clock=FakeClock())
    assert r.feed("dev3", a[0]) is None
    assert r.pending_bytes == len(frame)
    assert r.feed("dev4", b[0]) is None  # evicts 'a' from dev3
    assert r.pending_bytes == len(frame)
    (reason,) = r.expire()
    assert reason.startswith(f"dropped frame 'a' from dev3: evicted after 0.0 s to make room (1 of {len(a)} chunks in)")
    assert [r.feed("dev4", c) for c in b[1:]][-1] == frame
    rejects(Reassembler(10, max_bytes=100).feed, "dev3", a[0], match="exceeds the reassembly limit of 100")
    small = Reassembler(10, max_bytes=1 << 20, max_partials=1)
    small.feed("dev3", a[0])
    small.feed("dev3", b[0])
    assert len(small.expire()) == 1


def test_chunk_rejections() -> None:
    frame = update_frame()
    good = chunk_frame(frame, "m1", chunk_bytes=50)
    r = Reassembler(timeout_s=10, max_bytes=1 << 20)

    def repack(chunk: bytes, **changes: int) -> bytes:
        magic, ver, id_len, index, total, flen, crc = struct.unpack_from("<4sBBIIII", chunk)
        fields = {"index": index, "total": total, "flen": flen, "crc": crc, **changes}
        head = struct.pack("<4sBBIIII", magic, ver, id_len, *fields.values())
        return head + chunk[22:]

    rejects(r.feed, "dev3", good[0][:10], match="chunk from dev3: truncated: 10 bytes, shorter than the 22-byte")
    rejects(r.feed, "dev3", good[0][:24], match="leaves no payload after a 2-byte id")
    rejects(r.feed, "dev3", b"XCHK" + good[0][4:], match="bad magic b'XCHK'")
    rejects(r.feed, "dev3", good[0][:4] + b"\x09" + good[0][5:], match="chunk version 9")
    rejects(r.feed, "dev3", good[0][:22] + b"m/" + good[0][24:], match="msg id b'm/' must match")
    rejects(r.feed, "dev3", good[0][:-1] + bytes([good[0][-1] ^ 1]), match="crc32 mismatch")
    rejects(r.feed, "dev3", repack(good[0], index=99), match=r"index 99, total \d+, frame length \d+ are inconsistent")
    rejects(r.feed, "dev3", repack(good[0], total=0), match="are inconsistent")
    rejects(r.feed, "dev3", "str", match="payload must be bytes")
    assert r.feed("dev3", good[0]) is None
    rejects(
        r.feed,
        "dev3",
        repack(good[1], total=99),
        match=f"earlier chunks said {len(good)} / {len(frame)}; partial frame dropped",
    )
    assert r.pending_bytes == 0
    assert r.feed("dev3", good[0]) is None
    other = chunk_frame(b"x" * len(frame), "m1", chunk_bytes=50)[0]
    rejects(r.feed, "dev3", other, match="duplicate with different content")
    assert r.pending_bytes == 0
    rejects(chunk_frame, frame, "bad id", match="msg_id 'bad id' must match")
    rejects(chunk_frame, b"", "m", match="frame of 0 bytes")
    rejects(chunk_frame, frame, "m", chunk_bytes=0, match="chunk_bytes must be >= 1")


def test_chunks_that_overfill_the_announced_length_are_rejected() -> None:
    # Two chunks announcing a 3-byte frame but carrying 2 bytes each.
    def chunk(index: int, payload: bytes) -> bytes:
        import zlib

        return struct.pack("<4sBBIIII", b"OCHK", CHUNK_VERSION, 1, index, 2, 3, zlib.crc32(payload)) + b"m" + payload

    r = Reassembler(timeout_s=10, max_bytes=1 << 20)
    assert r.feed("dev3", chunk(0, b"ab")) is None
    rejects(r.feed, "dev3", chunk(1, b"cd"), match="2 payload bytes do not fit an even split of 3 bytes into 2 chunks")
    assert r.pending_bytes == 0  # the partial frame went with it
    # ... and too few bytes: chunks of 1 byte cannot cover 3 in 2, which the first chunk already shows.
    rejects(r.feed, "dev3", chunk(0, b"a"), match="1 payload bytes do not fit an even split of 3 bytes")
    assert r.pending_bytes == 0


def test_reassembler_refuses_a_frame_over_its_cap_at_the_first_chunk():
    from runtime.chunks import Reassembler, chunk_frame

    r = Reassembler(timeout_s=10, max_bytes=1 << 20, max_frame_bytes=1000)
    chunks = chunk_frame(b"x" * 5000, "big", chunk_bytes=1024)
    with pytest.raises(ProtocolError, match="5000-byte frame, over the limit of 1000"):
        r.feed("dev/a/update", chunks[0])
    assert r.pending_bytes == 0
    small = chunk_frame(b"y" * 900, "small")
    assert r.feed("dev/a/update", small[0]) == b"y" * 900
