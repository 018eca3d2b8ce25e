"""Chunks: how a frame travels over MQTT, and how the receiver puts it back together.

Every frame is sent as one or more chunks — one code path, even for frames that fit in one,
so the reassembly logic is exercised by every message, not only by big ones. Chunk layout
(integers little-endian, 22-byte fixed header)::

    b"OCHK" | version u8 | id_len u8 | index u32 | total u32 | frame_len u32 | crc32 u32 | msg_id | payload

The CRC-32 covers the payload: a frame's SHA-256 covers only its body, so the CRC is what
catches a damaged frame header in transit. `Reassembler` rebuilds frames per (key, msg_id).
Like the frame decoders, it raises only `ProtocolError`.

Every chunk but the last carries the same payload size (`chunk_frame` splits evenly), so any one
chunk places itself: chunk i starts at i x that size. The receiver appends each payload to the
frame's buffer as it comes (in order, as MQTT delivers one publisher's messages; one that
comes early waits for the gap) and hands back that buffer: one copy from MQTT message to frame,
none at completion (a 10 MB frame used to be copied out of each chunk, then joined). A chunk
that breaks the even layout is refused with the partial frame.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from runtime.errors import ProtocolError
from runtime.protocol import PROTOCOL_VERSION
from runtime.record import field, record
from runtime.seal import MAC_BYTES, MacStream, seal_head
from runtime.wire_json import ID_PATTERN, show

CHUNK_MAGIC = b"OCHK"
CHUNK_VERSION = PROTOCOL_VERSION
DEFAULT_CHUNK_BYTES = 256 * 1024

_CHUNK = struct.Struct("<4sBBIIII")  # magic, version, id length, index, total, frame length, crc32


def chunk_frame(frame: bytes | bytearray | memoryview, msg_id: str,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """Split a frame into chunks of at most `chunk_bytes` payload each (always at least one chunk).

    `msg_id` must be unique per send (e.g. a uuid4 hex or "<task id>.<attempt>"): the receiver
    ignores chunks of a msg_id it completed within its timeout, so a re-sent frame needs a new id.
    """
    view = memoryview(frame).cast("B")
    _check_split(len(view), msg_id, chunk_bytes)
    return list(_chunks(b"", view, None, msg_id, chunk_bytes))


def chunk_sealed(payload: bytes | bytearray | memoryview, *, key: bytes, run_id: str, device_id: str, kind: str,
                 msg_id: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """The chunks of `seal(payload, ...)` (the same bytes as `chunk_frame` of it), made one at a
    time as the caller takes them: each chunk's share of the MAC is computed when it is, so sealing
    overlaps the publishing of the chunks before it and no sealed copy of the payload is made.
    Bad arguments raise here, before the first chunk."""
    view = memoryview(payload).cast("B")
    head, mac = seal_head(len(view), key=key, run_id=run_id, device_id=device_id, kind=kind)
    _check_split(len(head) + len(view) + MAC_BYTES, msg_id, chunk_bytes)
    return _chunks(head, view, mac, msg_id, chunk_bytes)


def _check_split(frame_len: int, msg_id: str, chunk_bytes: int) -> None:
    if not isinstance(msg_id, str) or not ID_PATTERN.fullmatch(msg_id):
        raise ProtocolError(f"chunking: msg_id {show(msg_id)} must match {ID_PATTERN.pattern}")
    if chunk_bytes < 1:
        raise ProtocolError(f"chunking: chunk_bytes must be >= 1, got {chunk_bytes}")
    if not 0 < frame_len <= 0xFFFFFFFF:
        raise ProtocolError(f"chunking: frame of {frame_len} bytes, expected 1..{0xFFFFFFFF}")


def _chunks(head: bytes, body: memoryview, mac: MacStream | None, msg_id: str, chunk_bytes: int) -> Iterator[bytes]:
    """Chunks of the frame `head | body | mac digest` (no digest without `mac`); `mac` has been fed
    `head` and is fed each piece of `body` as its chunk is made. Each chunk is one copy of its
    pieces (slices of `body` are views)."""
    ident = msg_id.encode("ascii")
    body_end = len(head) + len(body)
    frame_len = body_end + (MAC_BYTES if mac is not None else 0)
    digest = b""
    for index in range(-(-frame_len // chunk_bytes)):
        lo, hi = index * chunk_bytes, min(frame_len, (index + 1) * chunk_bytes)
        pieces: list[bytes | memoryview] = [head[lo:hi]] if lo < len(head) else []
        if lo < body_end and hi > len(head):
            pieces.append(body[max(lo - len(head), 0):hi - len(head)])
            if mac is not None:
                mac.update(pieces[-1])
        if mac is not None and hi > body_end:
            digest = digest or mac.digest()
            pieces.append(digest[max(lo - body_end, 0):hi - body_end])
        crc = 0
        for piece in pieces:
            crc = zlib.crc32(piece, crc)
        yield b"".join((_CHUNK.pack(CHUNK_MAGIC, CHUNK_VERSION, len(ident), index, -(-frame_len // chunk_bytes),
                                    frame_len, crc), ident, *pieces))


class FrameBuffer(bytearray):
    """A frame as the Reassembler rebuilds it. `mac`: its running MAC (runtime.seal.MacStream) when
    the receiver gave the sender's key, fed each chunk as it is appended in order; `open_sealed`
    takes it instead of hashing the frame again."""

    __slots__ = ("mac",)

    def __init__(self) -> None:
        super().__init__()
        self.mac: MacStream | None = None


@record(frozen=False)
class _Partial:
    started_s: float
    total: int
    frame_len: int
    # The frame so far: chunks in order are appended, a chunk ahead of a gap waits in `early`.
    # Growing with what arrived (not one frame_len allocation at the first chunk) means a chunk
    # that announces 64 MB costs 64 MB of memory only once 64 MB of chunks came.
    buffer: FrameBuffer = field(default_factory=FrameBuffer)
    early: dict[int, bytes] = field(default_factory=dict)
    stride: int = 0  # payload bytes of every chunk but the last; 0 until a chunk tells
    parts: set[int] = field(default_factory=set)  # indices in
    received: int = 0
    wire_bytes: int = 0  # whole chunks (headers included): what the broker carried


class Reassembler:
    """Rebuilds frames from chunks per (key, msg_id); key is the sender (device id or topic).

    Memory is bounded up front: a partial frame reserves its full `frame_len` against
    `max_bytes` when its first chunk arrives. Each sender (key) may hold at most
    `max_sender_partials` partial frames and `max_sender_bytes` reserved bytes: a sender over
    its quota loses its own oldest partial, never someone else's. When the whole budget is full,
    the oldest partial of the sender holding the most bytes goes, so a flood of first chunks
    announcing huge frames evicts the flooder, not the devices sending real updates (before
    this, 300 such chunks a second turned 12 aggregations in 15 s into 1). Every drop has a
    reason; expiring frames returns their memory to the OS (`release_heap`), since glibc keeps
    freed 256 KiB chunks in its heap otherwise (509 MB RSS long after ten frames expired).
    Chunks of a msg_id completed within `timeout_s` are
    ignored, so a QoS-1 redelivery is counted once. Thread-safe (one lock), so the MQTT
    callback thread may feed while a timer thread calls `expire`.
    """

    def __init__(
        self,
        timeout_s: float,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        max_partials: int = 256,
        max_frame_bytes: int | None = None,
        max_sender_partials: int = 8,
        max_sender_bytes: int | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        # One frame's cap (the decoder's FrameLimits.max_frame_bytes): a frame announcing more is
        # refused at its first chunk instead of being held in memory until the decoder refuses it.
        self.max_frame_bytes = max_bytes if max_frame_bytes is None else min(max_frame_bytes, max_bytes)
        self.max_partials = max_partials
        self.max_sender_partials = max_sender_partials
        self.max_sender_bytes = max_bytes if max_sender_bytes is None else max_sender_bytes
        self._clock = clock
        self._partials: dict[tuple[str, str], _Partial] = {}
        self._by_sender: dict[str, list[int]] = {}  # key -> [partials, reserved bytes]
        self._done: dict[tuple[str, str], float] = {}  # completion time, oldest first
        self._reserved = 0
        self._reasons: list[str] = []  # drops since the last expire()
        self._lock = threading.Lock()
        # Chunk bytes (headers included) of the frame the last feed() returned: the link's cost of
        # that frame, for whoever feeds from one thread (the server's message loop).
        self.completed_wire_bytes = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes reserved by incomplete frames."""
        return self._reserved

    def feed(self, key: str, chunk: bytes | bytearray | memoryview, mac_key: bytes | None = None) -> memoryview | None:
        """Add one chunk; return the whole frame once all its chunks are in, else None.

        The frame is a writable view of the buffer the chunks were copied into, the caller's from
        then on (decoders read tensors in place from it). `mac_key`: the sender's sealing key, if
        the frame is a sealed message: its MAC is then computed chunk by chunk as they come
        (`FrameBuffer.mac`), and opening the frame only compares it."""
        msg_id, index, total, frame_len, payload = self._parse(key, chunk)
        ident = (key, msg_id)
        ctx = f"chunk {index} of {msg_id!r} from {key}"
        with self._lock:
            now = self._clock()
            if ident in self._done:
                return None
            partial = self._partials.get(ident)
            if partial is None:
                if frame_len > min(self.max_frame_bytes, self.max_sender_bytes):
                    raise ProtocolError(f"{ctx}: announces a {frame_len}-byte frame, over the limit of "
                                        f"{min(self.max_frame_bytes, self.max_sender_bytes)} bytes")
                self._make_room(key, frame_len, now)
                partial = self._partials[ident] = _Partial(now, total, frame_len)
                if mac_key is not None:
                    partial.buffer.mac = MacStream(mac_key, frame_len)
                self._reserved += frame_len
                held = self._by_sender.setdefault(key, [0, 0])
                held[0] += 1
                held[1] += frame_len
            elif (partial.total, partial.frame_len) != (total, frame_len):
                self._drop(ident)
                raise ProtocolError(
                    f"{ctx}: says {total} chunks / {frame_len} bytes, earlier chunks said "
                    f"{partial.total} / {partial.frame_len}; partial frame dropped"
                )
            start = self._place(partial, index, len(payload))
            if start is None:
                self._drop(ident)
                raise ProtocolError(
                    f"{ctx}: {len(payload)} payload bytes do not fit an even split of {frame_len} bytes "
                    f"into {total} chunks" + (f" of {partial.stride}" if partial.stride else "")
                    + "; partial frame dropped")
            if index in partial.parts:
                kept = (partial.buffer[start:start + len(payload)] if start < len(partial.buffer)
                        else partial.early[index])
                if kept == bytes(payload):
                    return None  # redelivered duplicate
                self._drop(ident)
                raise ProtocolError(f"{ctx}: duplicate with different content; partial frame dropped")
            if start == len(partial.buffer):
                partial.buffer += payload
                mac = partial.buffer.mac
                if mac is not None:
                    mac.update(payload)
                while partial.early and len(partial.buffer) // partial.stride in partial.early:
                    piece = partial.early.pop(len(partial.buffer) // partial.stride)
                    partial.buffer += piece
                    if mac is not None:
                        mac.update(piece)
            else:
                partial.early[index] = bytes(payload)
            partial.parts.add(index)
            partial.received += len(payload)
            partial.wire_bytes += len(chunk)
            if len(partial.parts) < total:
                return None
            self._drop(ident)
            self._done[ident] = now
            self.completed_wire_bytes = partial.wire_bytes
            while len(self._done) > 4 * self.max_partials:  # bound the memory of finished ids
                del self._done[next(iter(self._done))]
            return memoryview(partial.buffer)  # no more appends: the view pins its size

    def expire(self) -> list[str]:
        """Drop partial frames older than timeout_s; return why each frame was dropped since last call."""
        with self._lock:
            now = self._clock()
            dropped = False
            for ident, partial in list(self._partials.items()):
                age = now - partial.started_s
                if age > self.timeout_s:
                    dropped = True
                    missing = [i for i in range(partial.total) if i not in partial.parts]
                    self._drop(ident)
                    self._reasons.append(
                        f"dropped frame {ident[1]!r} from {ident[0]}: {len(partial.parts)} of "
                        f"{partial.total} chunks after {age:.1f} s (timeout {self.timeout_s:g} s), "
                        f"missing {show(missing, 80)}"
                    )
            for ident, done_s in list(self._done.items()):
                if now - done_s > self.timeout_s:
                    del self._done[ident]
            reasons, self._reasons = self._reasons, []
        if dropped or reasons:
            release_heap()
        return reasons

    @staticmethod
    def _place(partial: _Partial, index: int, size: int) -> int | None:
        """Where chunk `index` of `size` payload bytes starts in the frame, or None if it cannot
        belong to an even split (every chunk `stride` bytes but the last, which holds the rest)."""
        last = index == partial.total - 1
        if partial.total == 1:
            stride = partial.frame_len
        elif not last:
            stride = size
        elif (partial.frame_len - size) % (partial.total - 1):
            return None
        else:
            stride = (partial.frame_len - size) // (partial.total - 1)
        if partial.stride and stride != partial.stride:
            return None
        tail = partial.frame_len - (partial.total - 1) * stride
        if stride < 1 or not 0 < tail <= stride or size != (tail if last else stride):
            return None
        partial.stride = stride
        return index * stride

    def _parse(self, key: str, chunk: bytes | bytearray | memoryview) -> tuple[str, int, int, int, memoryview]:
        ctx = f"chunk from {key}"
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"{ctx}: payload must be bytes, got {type(chunk).__name__}")
        chunk = memoryview(chunk).cast("B")  # views, not copies, of the header and payload
        if len(chunk) < _CHUNK.size:
            raise ProtocolError(f"{ctx}: truncated: {len(chunk)} bytes, shorter than the {_CHUNK.size}-byte header")
        magic, version, id_len, index, total, frame_len, crc = _CHUNK.unpack_from(chunk)
        if magic != CHUNK_MAGIC:
            raise ProtocolError(f"{ctx}: bad magic {magic!r}, expected {CHUNK_MAGIC!r}")
        if version != CHUNK_VERSION:
            raise ProtocolError(f"{ctx}: chunk version {version}, this side speaks {CHUNK_VERSION}")
        start = _CHUNK.size + id_len
        if len(chunk) <= start:
            raise ProtocolError(f"{ctx}: truncated: {len(chunk)} bytes leaves no payload after a {id_len}-byte id")
        try:
            msg_id = bytes(chunk[_CHUNK.size : start]).decode("ascii")
        except UnicodeDecodeError:
            msg_id = ""
        if not ID_PATTERN.fullmatch(msg_id):
            raw = bytes(chunk[_CHUNK.size : start])
            raise ProtocolError(f"{ctx}: msg id {show(raw)} must match {ID_PATTERN.pattern}")
        payload = chunk[start:]
        ctx = f"chunk {index} of {msg_id!r} from {key}"
        if not index < total <= frame_len:
            raise ProtocolError(f"{ctx}: index {index}, total {total}, frame length {frame_len} are inconsistent")
        if frame_len > self.max_bytes:
            raise ProtocolError(f"{ctx}: frame of {frame_len} bytes exceeds the reassembly limit of {self.max_bytes}")
        if zlib.crc32(payload) != crc:
            raise ProtocolError(f"{ctx}: crc32 mismatch (header {crc:08x}, payload {zlib.crc32(payload):08x})")
        return msg_id, index, total, frame_len, payload

    def _make_room(self, key: str, frame_len: int, now: float) -> None:
        held = self._by_sender.get(key, [0, 0])
        while held[0] and (held[0] >= self.max_sender_partials or held[1] + frame_len > self.max_sender_bytes):
            self._evict(key, now, "over its sender's quota")
        while self._partials and (
            self._reserved + frame_len > self.max_bytes or len(self._partials) >= self.max_partials
        ):
            heaviest = max(self._by_sender, key=lambda k: self._by_sender[k][1])
            self._evict(heaviest, now, "to make room")

    def _evict(self, key: str, now: float, why: str) -> None:
        """Drop `key`'s oldest partial (insertion order is arrival order)."""
        ident, partial = next((i, p) for i, p in self._partials.items() if i[0] == key)
        self._drop(ident)
        self._reasons.append(
            f"dropped frame {ident[1]!r} from {ident[0]}: evicted after {now - partial.started_s:.1f} s {why} "
            f"({len(partial.parts)} of {partial.total} chunks in)"
        )

    def _drop(self, ident: tuple[str, str]) -> None:
        partial = self._partials.pop(ident, None)
        if partial is not None:
            self._reserved -= partial.frame_len
            held = self._by_sender[ident[0]]
            held[0] -= 1
            held[1] -= partial.frame_len
            if held[0] == 0:
                del self._by_sender[ident[0]]


def release_heap() -> None:
    """Hand freed heap memory back to the OS where the C library can (glibc's malloc_trim);
    elsewhere a no-op. Called after partial frames are dropped."""
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None
