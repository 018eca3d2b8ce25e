"""A direct TCP stream of frames between MP-SL data owners and compute nodes.

Each message is a u32 little-endian length then one `runtime.frames` split frame, decoded with
the same validation as every other frame (schema, sizes, SHA-256 of the body, finite values).
Chosen over MQTT through the broker for per-batch activations and gradients by measurement
(bench/, README "MP-SL"): the broker hop copies every frame twice and chunks it at 256 KiB.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from runtime.errors import TransportError
from runtime.frames import DEFAULT_LIMITS, decode_split, encode_split
from runtime.protocol import SplitMessage

_LEN = struct.Struct("<I")


def parse_addr(text: str) -> tuple[str, int]:
    """'host:port' -> (host, port); TransportError naming the value (port 0: any free port, for listening)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise TransportError(f"address {text!r} must be host:port")
    return host, int(port)


class FrameStream:
    """One TCP connection carrying split frames; `send` may be called from several threads."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self._send_lock = threading.Lock()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def connect(cls, addr: str, timeout_s: float = 10.0) -> FrameStream:
        host, port = parse_addr(addr)
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as exc:
            raise TransportError(f"cannot reach compute node {addr}: {exc}") from None
        sock.settimeout(None)
        return cls(sock, addr)

    def send(self, msg: SplitMessage) -> int:
        frame = encode_split(msg)
        try:
            with self._send_lock:
                self.sock.sendall(_LEN.pack(len(frame)) + frame)
        except OSError as exc:
            raise TransportError(f"sending {msg.split_op} to {self.peer} failed: {exc}") from None
        return len(frame)

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except socket.timeout:
                raise
            except OSError as exc:
                raise TransportError(f"connection to {self.peer} failed: {exc}") from None
            if not chunk:
                raise TransportError(f"{self.peer} closed the connection")
            buf += chunk
        return bytes(buf)

    def recv(self, timeout_s: float | None = None) -> SplitMessage:
        """The next message; socket.timeout after `timeout_s`, TransportError when the peer is gone,
        ProtocolError (one line, the frame dropped) when the frame is malformed."""
        self.sock.settimeout(timeout_s)
        (size,) = _LEN.unpack(self._read(_LEN.size))
        if size > DEFAULT_LIMITS.max_frame_bytes:
            raise TransportError(f"{self.peer} announced a {size}-byte frame, over the limit; connection dropped")
        frame = self._read(size)
        return decode_split(frame, source=self.peer)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
