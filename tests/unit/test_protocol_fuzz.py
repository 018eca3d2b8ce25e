"""Fuzz every decoder and the reassembler: whatever the bytes, only ProtocolError comes out.

Random bytes mostly die at the magic check, so most strategies start from valid messages and
damage them: bit flips, truncations, splices, and header edits that keep the SHA-256 and the
header length consistent (so the damage reaches the deep checks instead of the hash check).
A frame that survives decoding must also re-encode: the encoder accepts whatever the decoder does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.chunks import Reassembler, chunk_frame
from runtime.errors import ProtocolError
from runtime.frames import (
    FRAME_VERSION,
    FrameLimits,
    decode_artifact,
    decode_task,
    decode_update,
    encode_artifact,
    encode_task,
    encode_update,
)
from runtime.protocol import Hello, ServerState, Status, Telemetry, decode_json, encode_json
from tests.unit.protocol_samples import (
    JSON_SAMPLES,
    artifact_frame,
    task_frame,
    update_frame,
)

FUZZ = settings(
    max_examples=300,
    deadline=None,  # two shared cores: timing is noise here
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SMALL_LIMITS = FrameLimits(max_frame_bytes=1 << 16, max_tensor_elements=1 << 16)
FRAMES = [task_frame(), update_frame(), artifact_frame()]
JSONS = [encode_json(make()) for make in JSON_SAMPLES]
FRAME_DECODERS: list[tuple[Callable[..., Any], Callable[..., bytes]]] = [
    (decode_task, encode_task),
    (decode_update, encode_update),
    (decode_artifact, encode_artifact),
]
JSON_TYPES: list[type[Any]] = [Hello, Status, Telemetry, ServerState]


def feed_all(data: bytes) -> None:
    """Every decoder gets the bytes; only ProtocolError may come back; survivors re-encode."""
    for decode, encode in FRAME_DECODERS:
        try:
            msg = decode(data, source="fuzz", limits=SMALL_LIMITS)
        except ProtocolError:
            continue
        decode(encode(msg, limits=SMALL_LIMITS), limits=SMALL_LIMITS)
    for cls in JSON_TYPES:
        try:
            msg = decode_json(cls, data, source="fuzz")
        except ProtocolError:
            continue
        assert decode_json(cls, encode_json(msg)) == msg
    reassembler = Reassembler(timeout_s=1, max_bytes=1 << 16, clock=lambda: 0.0)
    with contextlib.suppress(ProtocolError):
        reassembler.feed("fuzz", data)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def rebuild(header: Any, body: bytes) -> bytes:
    """Frame with a consistent hash, body length and header length around an edited header."""
    if isinstance(header, dict):
        header["body_sha256"] = hashlib.sha256(body).hexdigest()
        header["body_len"] = len(body)
    raw = json.dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("<4sBI", b"ORCH", FRAME_VERSION, len(raw)) + raw + body


def split(frame: bytes) -> tuple[dict[str, Any], bytes]:
    hlen = struct.unpack_from("<I", frame, 5)[0]
    return json.loads(frame[9 : 9 + hlen]), frame[9 + hlen :]


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key/index path into a JSON value, so an edit can land anywhere in the header."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


def set_path(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    *head, last = path
    target = obj
    for key in head:
        target = target[key]
    target[last] = value
    return obj


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    feed_all(data)


@FUZZ
@given(st.binary(max_size=64))
def test_random_bytes_after_a_valid_prefix(tail: bytes) -> None:
    for frame in FRAMES:
        feed_all(frame[:9] + tail)
    feed_all(b'{"msg":"status","v":1,' + tail)
    feed_all(b"OCHK\x01" + tail)


@FUZZ
@given(st.sampled_from(FRAMES + JSONS), st.data())
def test_mutated_valid_messages(original: bytes, data: st.DataObject) -> None:
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "byte"]))
        pos = data.draw(st.integers(0, max(len(mutated) - 1, 0)))
        if op == "flip" and mutated:
            mutated[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "byte" and mutated:
            mutated[pos] = data.draw(st.integers(0, 255))
        elif op == "truncate":
            del mutated[pos:]
        elif op == "insert":
            mutated[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del mutated[pos : pos + data.draw(st.integers(1, 8))]
    feed_all(bytes(mutated))


@FUZZ
@given(st.sampled_from(FRAMES), st.data(), json_values)
def test_header_edits_with_consistent_hash(frame: bytes, data: st.DataObject, value: Any) -> None:
    header, body = split(frame)
    path = data.draw(st.sampled_from(paths(header)))  # () replaces the whole header
    if data.draw(st.booleans()) and len(path) > 0 and isinstance(path[-1], str):
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]  # drop a key instead of replacing it
    else:
        header = set_path(header, path, value)
    feed_all(rebuild(header, body))


@FUZZ
@given(st.sampled_from(FRAMES[:2]), st.data())
def test_body_edits_with_consistent_hash(frame: bytes, data: st.DataObject) -> None:
    header, body = split(frame)
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(mutated) - 4))
        word = data.draw(
            st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\xff\xff", b"\x00\x7e\x00\x7c"])
            | st.binary(min_size=4, max_size=4)
        )
        mutated[pos : pos + 4] = word
    feed_all(rebuild(header, bytes(mutated)))


@FUZZ
@given(st.sampled_from(JSONS), st.data(), json_values)
def test_json_field_edits(message: bytes, data: st.DataObject, value: Any) -> None:
    obj = json.loads(message)
    path = data.draw(st.sampled_from(paths(obj)))
    obj = set_path(obj, path, value)
    feed_all(json.dumps(obj).encode("utf-8", "surrogatepass"))


@FUZZ
@given(st.data())
def test_reassembler_with_shuffled_duplicated_and_damaged_chunks(data: st.DataObject) -> None:
    frame = data.draw(st.sampled_from(FRAMES))
    chunks = chunk_frame(frame, "m1", chunk_bytes=data.draw(st.integers(16, 400)))
    stream = data.draw(st.lists(st.sampled_from(range(len(chunks))), max_size=2 * len(chunks) + 2))
    damage = data.draw(st.sets(st.integers(0, max(len(stream) - 1, 0)), max_size=2))
    clock_s = [0.0]
    r = Reassembler(timeout_s=5, max_bytes=4096, clock=lambda: clock_s[0], max_partials=2)
    complete = []
    for pos, i in enumerate(stream):
        chunk = bytearray(chunks[i])
        if pos in damage:
            chunk[data.draw(st.integers(0, len(chunk) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        key = data.draw(st.sampled_from(["dev3", "dev4"]))
        clock_s[0] += data.draw(st.sampled_from([0.0, 0.5, 3.0]))
        try:
            out = r.feed(key, bytes(chunk))
        except ProtocolError:
            continue
        finally:
            for reason in r.expire():
                assert reason.startswith("dropped frame")
        if out is not None:
            complete.append(out)
    assert 0 <= r.pending_bytes <= 4096
    for out in complete:
        # A flipped chunk index can put a good payload in the wrong slot (the CRC covers only
        # the payload): the frame then completes wrong, and the frame decoder must catch it.
        assert out == frame or decode_any_fails(out)


def decode_any_fails(data: bytes) -> bool:
    for decode, _ in FRAME_DECODERS:
        try:
            decode(data)
        except ProtocolError:
            continue
        return False
    return True


def test_fuzz_inputs_are_valid_to_start_with() -> None:
    for frame, (decode, _) in zip(FRAMES, FRAME_DECODERS, strict=True):
        decode(frame)
