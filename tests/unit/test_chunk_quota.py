"""Chunk reassembly under a flood: per-sender quotas, eviction of the heaviest sender, memory
released on expiry (runtime/chunks.py)."""

from __future__ import annotations

import zlib

import pytest

from runtime.chunks import _CHUNK, CHUNK_MAGIC, CHUNK_VERSION, Reassembler, chunk_frame, release_heap
from runtime.errors import ProtocolError


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def first_chunk(msg_id: str, frame_len: int, payload: bytes = b"x" * 64) -> bytes:
    """The first chunk of a frame announcing `frame_len` bytes that will never complete."""
    ident = msg_id.encode()
    total = max(2, -(-frame_len // len(payload)))
    head = _CHUNK.pack(CHUNK_MAGIC, CHUNK_VERSION, len(ident), 0, total, frame_len, zlib.crc32(payload))
    return head + ident + payload


def test_a_flooding_sender_evicts_only_itself() -> None:
    clock = FakeClock()
    r = Reassembler(timeout_s=60, max_bytes=10_000, clock=clock, max_sender_partials=3, max_sender_bytes=4_000)
    real = chunk_frame(b"R" * 900, "real", 300)
    assert r.feed("dev/a/update", real[0]) is None
    for i in range(50):
        r.feed("dev/evil/update", first_chunk(f"f{i}", 1_000))
    assert r.pending_bytes <= 900 + 3 * 1_000
    assert [r.feed("dev/a/update", c) for c in real[1:]][-1] == b"R" * 900
    reasons = r.expire()
    assert len(reasons) == 47 and all("from dev/evil/update" in x and "over its sender's quota" in x for x in reasons)
    with pytest.raises(ProtocolError, match="over the limit of 4000"):
        r.feed("dev/evil/update", first_chunk("big", 4_001))


def test_a_full_budget_evicts_the_heaviest_sender_first() -> None:
    r = Reassembler(timeout_s=60, max_bytes=3_000, clock=FakeClock(), max_sender_bytes=2_000)
    r.feed("dev/a/update", first_chunk("a1", 500))  # oldest, but light
    r.feed("dev/evil/update", first_chunk("e1", 2_000))
    r.feed("dev/b/update", first_chunk("b1", 1_000))  # needs room: evil holds the most
    (reason,) = r.expire()
    assert reason.startswith("dropped frame 'e1' from dev/evil/update: evicted after 0.0 s to make room")
    assert r.pending_bytes == 1_500


def test_expired_frames_free_their_reservation() -> None:
    clock = FakeClock()
    r = Reassembler(timeout_s=5, max_bytes=1 << 20, clock=clock)
    for i in range(10):
        r.feed(f"dev/d{i}/update", first_chunk(f"m{i}", 50_000))
    assert r.pending_bytes == 500_000
    clock.now = 6.0
    assert len(r.expire()) == 10
    assert r.pending_bytes == 0 and not r._by_sender
    release_heap()  # callable where glibc is absent too


def test_memory_of_expired_frames_goes_back_to_the_os() -> None:
    """Before: ten never-completing frames left the server at 509 MB RSS long after they expired
    (glibc kept the freed chunks in its heap). After: expire() trims the heap."""
    import os

    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    clock = FakeClock()
    r = Reassembler(timeout_s=5, max_bytes=1 << 30, clock=clock)
    base = proc.memory_info().rss
    for i in range(10):
        chunks = chunk_frame(os.urandom(8 << 20), f"m{i}")
        for c in chunks[:-1]:  # never completes
            r.feed(f"dev/d{i}/update", c)
        del chunks
    held = proc.memory_info().rss - base
    clock.now = 10.0
    assert len(r.expire()) == 10
    left = proc.memory_info().rss - base
    assert held > 60 << 20 and left < held / 4, f"held {held >> 20} MB, {left >> 20} MB left after expiry"
