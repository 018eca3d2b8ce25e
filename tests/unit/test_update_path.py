"""The update path as the server receives it: chunks reassembled in place (runtime/chunks.py),
opened (runtime/seal.py) and decoded without a copy (runtime/frames.py). Every bad input is
one clear ProtocolError, and it loses nothing that was good."""

from __future__ import annotations

import random
import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from runtime.chunks import _CHUNK, CHUNK_MAGIC, CHUNK_VERSION, Reassembler, chunk_frame
from runtime.errors import ProtocolError
from runtime.frames import decode_update, encode_update
from runtime.protocol import SparseTensor, Update
from runtime.seal import MAC_BYTES, PAYLOAD_ALIGN, open_sealed, seal

KEY = bytes(range(32))


def update(n: int = 10_000, **tensors: object) -> Update:
    rng = np.random.default_rng(1)
    body = tensors or {"w": rng.standard_normal(n).astype(np.float32), "b": np.arange(7, dtype=np.float32)}
    return Update(task_id="t1", device_id="dev1", base_version=3, n_samples=32, train_s=1.0, peak_rss_mb=1.0,
                  energy_j=None, kind="delta", tensors=body)  # type: ignore[arg-type]


def sealed_update(u: Update | None = None, device_id: str = "dev1") -> bytes:
    return seal(encode_update(u or update()), key=KEY, run_id="run1", device_id=device_id, kind="update")


def receive(frame: bytes | memoryview) -> Update:
    """What server/service.py does with a reassembled frame."""
    return decode_update(open_sealed(frame, key=KEY, run_id="run1", device_id="dev1", kind="update"), source="dev1")


def feed_all(r: Reassembler, chunks: list[bytes], key: str = "dev1") -> memoryview | None:
    out = None
    for c in chunks:
        got = r.feed(key, c)
        if got is not None:
            assert out is None, "a frame completed twice"
            out = got
    return out


def raw_chunk(index: int, total: int, frame_len: int, payload: bytes, msg_id: bytes = b"m") -> bytes:
    head = _CHUNK.pack(CHUNK_MAGIC, CHUNK_VERSION, len(msg_id), index, total, frame_len, zlib.crc32(payload))
    return head + msg_id + payload


@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled", "duplicated"])
def test_chunks_in_any_order_and_redelivered_rebuild_the_same_frame(order: str) -> None:
    data = sealed_update()
    chunks = chunk_frame(data, "m1", chunk_bytes=4096)
    if order == "reversed":
        chunks = chunks[::-1]
    elif order == "shuffled":
        random.Random(7).shuffle(chunks)
    elif order == "duplicated":  # QoS 1 redeliveries, one of them after the frame completed
        chunks = chunks[:3] + chunks[:5] + chunks[3:] + chunks[-1:]
    r = Reassembler(timeout_s=10, max_bytes=1 << 24)
    frame = feed_all(r, chunks)
    assert frame is not None and bytes(frame) == data and r.pending_bytes == 0
    got = receive(frame)
    np.testing.assert_array_equal(got.tensors["w"], update().tensors["w"])


def test_a_reassembled_dense_update_decodes_in_place_writable_and_aligned() -> None:
    data = sealed_update()
    frame = feed_all(Reassembler(timeout_s=10, max_bytes=1 << 24), chunk_frame(data, "m1", chunk_bytes=1000))
    assert frame is not None
    got = receive(frame)
    w = got.tensors["w"]
    assert isinstance(w, np.ndarray)
    assert np.shares_memory(w, np.frombuffer(frame, np.uint8)), "the tensor should be a view of the frame"
    assert w.flags.writeable and w.flags.aligned and w.dtype == np.float32
    w += 1.0  # the server merges in place
    # From read-only bytes (no reassembly buffer), the decoder copies: still writable arrays.
    copied = decode_update(encode_update(update()))
    assert copied.tensors["w"].flags.writeable  # type: ignore[union-attr]


@pytest.mark.parametrize("device_id", ["d", "dev1", "device-with-a-long-name-0042"])
def test_payload_and_body_start_aligned_whatever_the_id_lengths(device_id: str) -> None:
    u = update(n=13)
    frame = encode_update(u)
    prefix, header_len = 9, struct.unpack_from("<I", frame, 5)[0]
    assert (prefix + header_len) % 8 == 0, "frame body is not 8-byte aligned"
    data = seal(frame, key=KEY, run_id="r", device_id=device_id, kind="update")
    seal_header_len = struct.unpack_from("<H", data, 5)[0]
    assert (7 + seal_header_len) % PAYLOAD_ALIGN == 0 and data[7 + seal_header_len:-MAC_BYTES] == frame


def test_mixed_tensors_decode_from_a_reassembled_frame() -> None:
    # fp16 and sparse entries are copied out (widened / index-converted); dense ones may be views.
    tensors = {"h": np.linspace(-1, 1, 5, dtype=np.float32),
               "s": SparseTensor(shape=(4, 5), indices=np.array([3, 1, 17]), values=np.ones(3, np.float32)),
               "w": np.arange(6, dtype=np.float32)}
    u = update(**tensors)
    data = seal(encode_update(u, encoding={"h": "fp16"}), key=KEY, run_id="run1", device_id="dev1", kind="update")
    frame = feed_all(Reassembler(timeout_s=10, max_bytes=1 << 20), chunk_frame(data, "m", chunk_bytes=16))
    assert frame is not None
    got = receive(frame)
    np.testing.assert_allclose(got.tensors["h"], tensors["h"], atol=1e-3)  # type: ignore[arg-type]
    s = got.tensors["s"]
    assert isinstance(s, SparseTensor) and s.indices.tolist() == [1, 3, 17] and s.indices.dtype == np.int32
    np.testing.assert_array_equal(got.tensors["w"], tensors["w"])  # type: ignore[arg-type]


def test_a_tampered_chunk_with_a_fixed_crc_fails_the_mac_with_one_clear_error() -> None:
    data = bytearray(sealed_update())
    data[len(data) // 2] ^= 0x01  # chunked after the damage: every chunk's CRC is consistent
    frame = feed_all(Reassembler(timeout_s=10, max_bytes=1 << 24), chunk_frame(bytes(data), "m1", chunk_bytes=4096))
    assert frame is not None
    with pytest.raises(ProtocolError, match=r"^update from dev1: bad MAC: not sealed under dev1's key"):
        receive(frame)


def test_the_body_hash_is_skipped_only_behind_a_verified_mac() -> None:
    frame = bytearray(encode_update(update(n=8)))
    frame[-1] ^= 0x01  # body no longer matches its header's sha256
    with pytest.raises(ProtocolError, match="body sha256 mismatch"):
        decode_update(bytes(frame))
    # The same bytes sealed by the device's key: the MAC vouches for every byte the device sent,
    # so the decoder does not hash them a second time (the sender's own header is its business).
    data = seal(bytes(frame), key=KEY, run_id="run1", device_id="dev1", kind="update")
    assert receive(data).tensors["b"].shape == (7,)  # type: ignore[union-attr]


def test_truncated_and_unevenly_split_chunks_are_refused_and_lose_nothing_else() -> None:
    good = chunk_frame(sealed_update(), "good", chunk_bytes=4096)
    r = Reassembler(timeout_s=10, max_bytes=1 << 24)
    assert r.feed("dev1", good[0]) is None
    with pytest.raises(ProtocolError, match="truncated: 10 bytes, shorter than the 22-byte header"):
        r.feed("dev1", good[1][:10])
    with pytest.raises(ProtocolError, match="crc32 mismatch"):
        r.feed("dev1", good[1][:-1])  # cut inside the payload
    # A chunk of another frame that breaks the even split: that partial frame goes, ours stays.
    assert r.feed("dev1", raw_chunk(0, 3, 10, b"abcd", b"bad")) is None
    with pytest.raises(ProtocolError, match="3 payload bytes do not fit an even split of 10 bytes into 3 chunks of 4"):
        r.feed("dev1", raw_chunk(1, 3, 10, b"efg", b"bad"))
    with pytest.raises(ProtocolError, match="do not fit an even split of 10 bytes into 3 chunks"):
        r.feed("dev1", raw_chunk(2, 3, 10, b"hijkl", b"bad2"))  # a last chunk longer than the stride
    frame = feed_all(r, good[1:])
    assert frame is not None and receive(frame).task_id == "t1" and r.pending_bytes == 0


def test_a_first_chunk_announcing_a_huge_frame_does_not_allocate_it() -> None:
    r = Reassembler(timeout_s=10, max_bytes=1 << 30)
    frame_len = 64 * 1024 * 1024
    tracemalloc.start()
    try:
        assert r.feed("dev2", raw_chunk(0, frame_len // 64, frame_len, b"\0" * 64, b"flood")) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.pending_bytes == frame_len  # reserved against the budget ...
    assert peak < 1024 * 1024, f"{peak} bytes allocated for one 64-byte chunk"  # ... not allocated
