"""What any path through a broker can at best do, next to raw TCP (bench/update_path.py's `raw_tcp_s`).

`relay_tcp_s`, two hops: the writer (RAW_WRITER above, unchanged) sends the
same bytes into a minimal relay process, which forwards every byte it reads to the reader and the
reader's one-byte answer back: a broker's unavoidable work (read from one socket, write to
another) with nothing else. `relay_cpu_ms`: CPU per transfer of all three processes.

`plain_paho_s`, the broker alone: the same chunk sizes the update path sends (the sealed frame
chunked at the config's chunk size, headers included), published at the config's QoS by a plain
paho-mqtt client in a second process, through the broker, to a plain paho subscriber in this
process, no Orchard code on either end. Timed from the first publish() to the on_message of the
last chunk (CLOCK_MONOTONIC, system-wide). `plain_device_cpu_ms` / `plain_server_cpu_ms`: CPU of
each end per transfer; `plain_broker_cpu_ms` the broker's (/proc ticks, mean over repeats). The
update path can be no faster than this through the same broker and client library: Orchard's own
cost is update_path_s - plain_paho_s.

On a loaded host wall times through three processes mostly measure the scheduler; the CPU totals
(`raw_tcp_cpu_ms`, `relay_cpu_ms`, `plain_total_cpu_ms`, `total_cpu_ms`) compare without it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

# The raw reference's writer: connects, then on each "go" line writes n bytes and waits for one byte.
RAW_WRITER = """
import os, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
data = os.urandom(n)
s = socket.create_connection(("127.0.0.1", port))
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() != "go":
        break
    cpu0, t0 = time.process_time(), time.monotonic()
    s.sendall(data)
    s.recv(1)
    print(f"{t0} {(time.process_time() - cpu0) * 1000}", flush=True)
s.close()
"""


# The relay: accepts the writer, connects to the reader, forwards both ways until the writer closes.
RELAY = """
import os, select, socket, sys, time
upstream_port = int(sys.argv[1])
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
down = socket.create_connection(("127.0.0.1", upstream_port))
up, _ = listener.accept()
buf = bytearray(1 << 20)
view = memoryview(buf)
peer = {up: down, down: up}
while True:
    for s in select.select([up, down], [], [])[0]:
        n = s.recv_into(buf)
        if n == 0:
            raise SystemExit(0)
        peer[s].sendall(view[:n])
        if s is down:  # the reader's answer ends a transfer: report this process's CPU so far
            print(time.process_time() * 1000, flush=True)
"""

# The plain paho device: on "go <qos>" publishes every chunk (sizes on the first stdin line) and
# waits for their PUBACKs; reports its start stamp and CPU.
PLAIN_DEVICE = """
import json, os, sys, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
host, port, topic, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sizes = json.loads(sys.stdin.readline())
chunks = [os.urandom(n) for n in sizes]
c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-device", protocol=paho.MQTTv311)
c.max_queued_messages_set(0)
c.max_inflight_messages_set(1000)
c.connect(host, port, keepalive=60)
c.loop_start()
while not c.is_connected():
    time.sleep(0.01)
print("ready", flush=True)
for line in sys.stdin:
    words = line.split()
    if not words or words[0] != "go":
        break
    qos = int(words[1])
    cpu0, t0 = time.process_time(), time.monotonic()
    infos = [c.publish(topic, chunk, qos=qos) for chunk in chunks]
    for info in infos:
        info.wait_for_publish(120)
    print(json.dumps({"t0": t0, "cpu_ms": (time.process_time() - cpu0) * 1000}), flush=True)
c.loop_stop()
c.disconnect()
"""


def proc_cpu_ms(pid: int) -> float:
    """utime + stime of a process (and its reaped children: none here), in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def chunk_sizes(frame_bytes: int, chunk_bytes: int, id_bytes: int = 14, head_bytes: int = 22) -> list[int]:
    """Message sizes of a frame chunked as runtime/chunks.chunk_frame does (an even split, a
    22-byte header and a msg id per chunk)."""
    total = -(-frame_bytes // chunk_bytes)
    return [head_bytes + id_bytes + min(chunk_bytes, frame_bytes - i * chunk_bytes) for i in range(total)]


class RawTcp:
    """The loopback reference: a writer process, this process reading into one buffer."""

    def __init__(self, n_bytes: int) -> None:
        import socket

        self.n_bytes = n_bytes
        self._server = socket.create_server(("127.0.0.1", 0))
        port = self._server.getsockname()[1]
        self._proc = subprocess.Popen([sys.executable, "-c", RAW_WRITER, str(port), str(n_bytes)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._conn, _ = self._server.accept()
        assert self._proc.stdout is not None
        self._proc.stdout.readline()
        self._buf = bytearray(n_bytes)

    def once(self) -> tuple[float, float]:
        """(seconds, CPU ms of both ends) for one transfer."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        view, got = memoryview(self._buf), 0
        cpu0 = time.process_time()
        self._proc.stdin.write("go\n")
        self._proc.stdin.flush()
        while got < self.n_bytes:
            got += self._conn.recv_into(view[got:])
        t_end = time.monotonic()
        self._conn.sendall(b"k")
        my_cpu = (time.process_time() - cpu0) * 1000
        t0, writer_cpu = (float(x) for x in self._proc.stdout.readline().split())
        return t_end - t0, my_cpu + writer_cpu

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=30)
        self._conn.close()
        self._server.close()


class RelayTcp:
    """RawTcp's writer and reader with a relay process between them."""

    def __init__(self, n_bytes: int) -> None:
        self.n_bytes = n_bytes
        self._server = socket.create_server(("127.0.0.1", 0))
        self._relay = subprocess.Popen([sys.executable, "-c", RELAY, str(self._server.getsockname()[1])],
                                       stdout=subprocess.PIPE, text=True)
        assert self._relay.stdout is not None
        relay_port = int(self._relay.stdout.readline())
        self._writer = subprocess.Popen([sys.executable, "-c", RAW_WRITER, str(relay_port), str(n_bytes)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._conn, _ = self._server.accept()
        assert self._writer.stdout is not None
        self._writer.stdout.readline()
        self._buf = bytearray(n_bytes)
        self._relay_cpu = 0.0

    def once(self) -> tuple[float, float]:
        """(seconds, CPU ms of the writer, the relay and the reader) for one transfer."""
        assert self._writer.stdin is not None and self._writer.stdout is not None
        assert self._relay.stdout is not None
        view, got = memoryview(self._buf), 0
        cpu0 = time.process_time()
        self._writer.stdin.write("go\n")
        self._writer.stdin.flush()
        while got < self.n_bytes:
            got += self._conn.recv_into(view[got:])
        t_end = time.monotonic()
        self._conn.sendall(b"k")
        my_cpu = (time.process_time() - cpu0) * 1000
        t0, writer_cpu = (float(x) for x in self._writer.stdout.readline().split())
        relay_cpu = float(self._relay.stdout.readline())
        cpu, self._relay_cpu = relay_cpu - self._relay_cpu, relay_cpu
        return t_end - t0, my_cpu + writer_cpu + cpu

    def close(self) -> None:
        assert self._writer.stdin is not None
        self._writer.stdin.close()
        self._writer.wait(timeout=30)
        self._conn.close()
        self._relay.wait(timeout=30)
        self._server.close()


class PlainPaho:
    """A plain paho publisher process and a plain paho subscriber here, through one broker."""

    def __init__(self, host: str, port: int, sizes: list[int], broker_pid: int | None, name: str = "plain") -> None:
        """`name`: unique per broker (one pair of clients and one topic per instance)."""
        self.broker_pid = broker_pid
        topic = f"bench/{name}"
        self.n_chunks = len(sizes)
        self.topic = topic
        self._done = threading.Event()
        self._got = 0
        self._t_last = 0.0
        self._sub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{name}-server",
                                protocol=paho.MQTTv311)
        self._sub.on_message = self._on_message
        subscribed = threading.Event()
        self._sub.on_subscribe = lambda *_a: subscribed.set()
        self._sub.connect(host, port, keepalive=60)
        self._sub.loop_start()
        self._sub.subscribe(topic, qos=1)
        if not subscribed.wait(10):
            raise RuntimeError(f"bench: plain paho subscriber got no SUBACK from {host}:{port}")
        self._dev = subprocess.Popen([sys.executable, "-c", PLAIN_DEVICE, host, str(port), topic,
                                      f"bench-{name}"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._dev.stdin is not None and self._dev.stdout is not None
        self._dev.stdin.write(json.dumps(sizes) + "\n")
        self._dev.stdin.flush()
        self._dev.stdout.readline()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        self._got += 1
        if self._got == self.n_chunks:
            self._t_last = time.monotonic()
            self._done.set()

    def once(self, qos: int) -> dict[str, float]:
        assert self._dev.stdin is not None and self._dev.stdout is not None
        self._done.clear()
        self._got = 0
        broker0 = proc_cpu_ms(self.broker_pid) if self.broker_pid else 0.0
        cpu0 = time.process_time()
        self._dev.stdin.write(f"go {qos}\n")
        self._dev.stdin.flush()
        if not self._done.wait(120):
            raise RuntimeError(f"bench: plain paho ({self.topic}) got {self._got} of {self.n_chunks} chunks in 120 s")
        server_cpu = (time.process_time() - cpu0) * 1000
        stamps = json.loads(self._dev.stdout.readline())
        broker_cpu = proc_cpu_ms(self.broker_pid) - broker0 if self.broker_pid else None
        return {"plain_paho_s": self._t_last - stamps["t0"], "plain_device_cpu_ms": stamps["cpu_ms"],
                "plain_server_cpu_ms": server_cpu, "plain_broker_cpu_ms": broker_cpu}

    def close(self) -> None:
        assert self._dev.stdin is not None
        self._dev.stdin.close()
        self._dev.wait(timeout=30)
        self._sub.loop_stop()
        self._sub.disconnect()
