"""Sealed envelopes: every message on a device's topics, bound to its run, device and kind.

Each payload on `dev/<id>/*` (hello, status, telemetry, update, task, artifact, receipt) travels
sealed under the device's own key, shared only by that device and the server. A frame is sealed
whole and then chunked (a device's update as it is chunked: runtime/chunks.py `chunk_sealed`,
the same bytes); JSON messages are sealed as they are. Layout (integers little-endian)::

    b"OSEL" | version u8 | header_len u16 | header (canonical JSON, space-padded) | payload | mac (32 bytes)

    header = {"dev": device id, "kind": message kind, "run": run id}
    mac    = HMAC-SHA256(device key, every byte before the mac)

The header is padded with spaces (JSON whitespace: any reader parses it the same) so that the
payload starts 8-byte aligned, and a frame's body, which frames align within the payload, can be
decoded in place, without a copy, from the buffer the chunks were reassembled into.
`open_sealed` returns the payload as a view of its input for the same reason.

The receiver checks, in this order, and refuses with the reason: the MAC under the key of the
device whose topic it came in on (a forgery, a tampered message or another device's key fails
here), then the run id (a replay from another run of a lab whose keys persist), then the device
(sealed for another device's topic) and the kind (a task replayed as an update). Kinds are
direction-specific, so a server message cannot be reflected back as a device's.

Why a whole-payload MAC and not one over the frame header (which holds the body's SHA-256): one
code path for JSON and frames, checked before any parsing. Since the MAC authenticates every
byte, a frame decoded from an `Opened` skips its own body SHA-256 (runtime/frames.py), so the
receiver hashes each byte once. Its cost, HMAC-SHA256 over a 10 MB update, is measured in
`make bench` (bench/mqtt_bench.py, `seal_10mb`; `mac_10mb` next to keyed BLAKE2).

Streaming (`MacStream`): the MAC is over every byte before it, in order, so either end can feed
it piece by piece: the device as it makes each chunk, while the chunks before it are published;
the server as each chunk is appended to the frame (runtime/chunks.py), while the next one is
still on the wire. It is the same MAC, so a frame is authenticated whole exactly as before: a
damaged, reordered-and-misplaced, truncated or spliced frame fails it at open.

Why HMAC-SHA256 and not keyed BLAKE2b (`mac_10mb`): on this host (SHA extensions) HMAC-SHA256
takes 5.4 ms per 10 MB against BLAKE2b's 7.8; with OpenSSL told the CPU has none, as on a Pi 4,
14.7 against 7.7. It would win on the device and lose on the server; kept until a board's own
figure decides it (a change is a new SEAL_VERSION).

The retained `server/state` is the one message left unsealed: it goes to every device at once,
and each device holds only its own key. It carries no work; a forged one can at most make a
device announce itself again (its hello is sealed) or hold its outbox, which waits for receipts.

Board code: standard library and runtime.errors / runtime.protocol only, Python 3.8 compatible.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from typing import Any, NamedTuple

from runtime.errors import ProtocolError
from runtime.protocol import PROTOCOL_VERSION
from runtime.wire_json import ID_PATTERN, dumps_canonical, loads_strict, show

SEAL_MAGIC = b"OSEL"
SEAL_VERSION = PROTOCOL_VERSION
MAC_BYTES = 32
KEY_BYTES = 32  # per-device key length the lab generates; shorter keys are refused
SEALED_KINDS = ("hello", "status", "telemetry", "update", "task", "artifact", "receipt")
# Run ids become config values and log fields: the same safe alphabet as device ids.
RUN_ID_PATTERN = ID_PATTERN
_PREFIX = struct.Struct("<4sBH")
_MAX_HEADER = 512
PAYLOAD_ALIGN = 8  # the payload's offset in a sealed message is a multiple of this
_HEADER_KEYS = frozenset({"dev", "kind", "run"})


class Opened(NamedTuple):
    """A message whose MAC, run, device and kind all checked out."""

    payload: memoryview  # a view into the received message, not a copy (writable if that was)
    run_id: str
    device_id: str
    kind: str


def check_key(key: bytes, who: str) -> bytes:
    if not isinstance(key, bytes) or len(key) < KEY_BYTES:
        raise ProtocolError(f"{who}: HMAC key must be at least {KEY_BYTES} bytes")
    return key


def parse_key(text: str, who: str) -> bytes:
    """A key as it is written in a credentials file: hex."""
    if not isinstance(text, str) or not re.fullmatch(r"[0-9a-fA-F]+", text or "") or len(text) % 2:
        raise ProtocolError(f"{who}: HMAC key must be hex digits, got {len(text) if isinstance(text, str) else 0} "
                            "characters that are not")
    return check_key(bytes.fromhex(text), who)


def seal_head(payload_bytes: int, *, key: bytes, run_id: str, device_id: str, kind: str) -> tuple[bytes, MacStream]:
    """The envelope's prefix and header for a payload of `payload_bytes`, and the MAC already fed
    with them: feed it the payload, then append its digest. `seal` does that at once; chunks.py's
    `chunk_sealed` does it chunk by chunk while the chunks are published."""
    ctx = f"sealing {kind} for {device_id}"
    if kind not in SEALED_KINDS:
        raise ProtocolError(f"{ctx}: kind must be one of {', '.join(SEALED_KINDS)}")
    for name, value in (("run id", run_id), ("device id", device_id)):
        if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
            raise ProtocolError(f"{ctx}: {name} {show(value)} must match {ID_PATTERN.pattern}")
    check_key(key, ctx)
    header = dumps_canonical({"dev": device_id, "kind": kind, "run": run_id}, ctx)
    header += b" " * (-(_PREFIX.size + len(header)) % PAYLOAD_ALIGN)
    head = _PREFIX.pack(SEAL_MAGIC, SEAL_VERSION, len(header)) + header
    mac = MacStream(key, len(head) + payload_bytes + MAC_BYTES)
    mac.update(head)
    return head, mac


def seal(payload: bytes | bytearray | memoryview, *, key: bytes, run_id: str, device_id: str, kind: str) -> bytes:
    """Wrap `payload` for the topic of `device_id`, run `run_id`, message `kind`."""
    head, mac = seal_head(len(payload), key=key, run_id=run_id, device_id=device_id, kind=kind)
    mac.update(payload)
    return b"".join((head, payload, mac.digest()))


class MacStream:
    """The HMAC-SHA256 of one sealed message of `sealed_bytes`, fed its bytes in order as they are
    produced or arrive (chunk by chunk), so neither end needs a pass of its own over the whole
    message. Bytes past the MAC's place (the MAC itself) are not fed. hashlib releases the GIL
    over large buffers, so the hashing runs beside the MQTT client's network thread."""

    __slots__ = ("_key", "_left", "_mac", "sealed_bytes")

    def __init__(self, key: bytes, sealed_bytes: int) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self._key = key
        self.sealed_bytes = sealed_bytes
        self._left = sealed_bytes - MAC_BYTES  # bytes before the MAC, still to come

    def update(self, piece: bytes | bytearray | memoryview) -> None:
        if self._left > 0:
            take = piece if len(piece) <= self._left else memoryview(piece)[:self._left]
            self._mac.update(take)
            self._left -= len(take)

    def covers(self, key: bytes, sealed_bytes: int) -> bool:
        """Whether this is the MAC, under `key`, of everything before the MAC of a message of
        `sealed_bytes`: the one `open_sealed` would compute."""
        return self._left == 0 and sealed_bytes == self.sealed_bytes and hmac.compare_digest(key, self._key)

    def digest(self) -> bytes:
        return self._mac.digest()


def open_sealed(data: bytes | bytearray | memoryview, *, key: bytes, run_id: str, device_id: str, kind: str,
                source: str = "") -> Opened:
    """Verify and unwrap a sealed message received on `device_id`'s `kind` topic.

    Raises ProtocolError naming why it was refused; returns the payload only once everything
    matched, so nothing downstream ever sees an unauthenticated byte."""
    ctx = f"{kind} from {source or device_id}"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{ctx}: payload must be bytes, got {type(data).__name__}")
    view = memoryview(data)
    if len(view) < _PREFIX.size + MAC_BYTES:
        raise ProtocolError(f"{ctx}: not sealed ({len(view)} bytes, shorter than an envelope)")
    magic, version, header_len = _PREFIX.unpack_from(view)
    if magic != SEAL_MAGIC:
        raise ProtocolError(f"{ctx}: not sealed (magic {bytes(magic)!r}, expected {SEAL_MAGIC!r})")
    if version != SEAL_VERSION:
        raise ProtocolError(f"{ctx}: envelope version {version}, this side speaks {SEAL_VERSION}")
    if header_len > _MAX_HEADER or _PREFIX.size + header_len + MAC_BYTES > len(view):
        raise ProtocolError(f"{ctx}: envelope header length {header_len} is out of bounds")
    end = len(view) - MAC_BYTES
    mac = _received_mac(view, key)
    if mac is None:
        mac = MacStream(key, len(view))
        mac.update(view[:end])
    claimed = _claimed(view[_PREFIX.size:_PREFIX.size + header_len], ctx)
    if not hmac.compare_digest(mac.digest(), bytes(view[end:])):
        raise ProtocolError(
            f"{ctx}: bad MAC: not sealed under {device_id}'s key (claims run {show(claimed[0], 40)}, "
            f"device {show(claimed[1], 40)}): forged, tampered, or from another lab")
    got_run, got_dev, got_kind = claimed
    if got_run != run_id:
        raise ProtocolError(f"{ctx}: sealed for run {show(got_run, 40)}, this is run {run_id!r} "
                            "(a replay from another run)")
    if got_dev != device_id:
        raise ProtocolError(f"{ctx}: sealed for device {show(got_dev, 40)}, received on {device_id}'s topic "
                            "(a replay from another device)")
    if got_kind != kind:
        raise ProtocolError(f"{ctx}: sealed as a {show(got_kind, 20)} message, received as {kind!r}")
    return Opened(view[_PREFIX.size + header_len:end], got_run, got_dev, got_kind)


def _received_mac(view: memoryview, key: bytes) -> MacStream | None:
    """The MAC the reassembler computed while this message's chunks came in (runtime/chunks.py:
    a frame's buffer carries it as `mac`), if it covers exactly these bytes under `key`. Taken
    once: a second open of the same buffer (whose tensors the decoder hands out writable)
    computes afresh."""
    owner: Any = view.obj
    mac = getattr(owner, "mac", None)
    if not isinstance(mac, MacStream) or not mac.covers(key, len(view)) or len(view) != len(owner):
        return None
    owner.mac = None
    return mac


def _claimed(header: memoryview, ctx: str) -> tuple[object, object, object]:
    """What the header claims; checked against the MAC before any of it is trusted."""
    try:
        obj = loads_strict(header, f"{ctx}: envelope header")
    except ProtocolError:
        return ("?", "?", "?")
    if not isinstance(obj, dict) or set(obj) != _HEADER_KEYS:
        return ("?", "?", "?")
    return (obj["run"], obj["dev"], obj["kind"])
