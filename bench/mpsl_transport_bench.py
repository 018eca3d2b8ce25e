"""MP-SL activation/gradient transport: one batch of the split `cnn` over MQTT (mosquitto, QoS 1,
256 KiB chunks, as updates travel) against a direct TCP frame stream (runtime/split_link.py).

A round trip is what a data owner waits for per hop: its `fwd` frame of M_1's output for a batch
of 32 on Fashion-MNIST (cut after conv2: 32 x 32 x 14 x 14 float32, 784 KiB) goes to a "node"
process, which decodes and validates it and answers with a same-size `bwd` frame, which the owner
decodes. Both paths use the same frames (encode_split / decode_split). Medians of `repeats`.

`run() -> dict` is merged into bench.json by bench/run.py; `python bench/mpsl_transport_bench.py`
prints it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.chunks import DEFAULT_CHUNK_BYTES, Reassembler, chunk_frame
from runtime.frames import decode_split, encode_split
from runtime.mqtt import Message, MqttClient, MqttConfig
from runtime.protocol import SplitMessage
from runtime.split_link import FrameStream
from testbed.broker import MosquittoBroker, find_mosquitto, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 14, 14)
UP, DOWN = "orchard/bench/split/up", "orchard/bench/split/down"

NODE_TCP = """
import socket, sys
from runtime.split_link import FrameStream
from runtime.protocol import SplitMessage
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
conn, peer = srv.accept()
s = FrameStream(conn, "owner")
while True:
    try:
        m = s.recv(None)
    except Exception:
        break
    s.send(SplitMessage("bwd", m.device_id, m.epoch, m.batch_index, tensors={"x": m.tensors["x"]}))
"""

NODE_MQTT = """
import sys
from runtime.chunks import Reassembler, chunk_frame
from runtime.frames import decode_split, encode_split
from runtime.mqtt import Message, MqttClient, MqttConfig
from runtime.protocol import SplitMessage
c = MqttClient(sys.argv[1], MqttConfig("bench-node", keepalive_s=30))
c.connect()
c.subscribe(sys.argv[2], qos=1)
print("ready", flush=True)
r = Reassembler(30.0, 64 << 20)
n = 0
while True:
    ev = c.get(60.0)
    if ev is None:
        break
    if not isinstance(ev, Message):
        continue
    frame = r.feed("owner", ev.payload)
    if frame is None:
        continue
    m = decode_split(frame, source="owner")
    out = encode_split(SplitMessage("bwd", m.device_id, m.epoch, m.batch_index, tensors={"x": m.tensors["x"]}))
    n += 1
    for chunk in chunk_frame(out, f"bwd{n}"):
        c.publish(sys.argv[3], chunk, qos=1, wait_s=30)
"""


def _frame(i: int) -> tuple[SplitMessage, int]:
    x = np.random.default_rng(i).normal(size=SHAPE).astype(np.float32)
    msg = SplitMessage("fwd", "own0", 0, i, tensors={"x": x})
    return msg, len(encode_split(msg))


def bench_tcp(repeats: int) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    node = subprocess.Popen([sys.executable, "-c", NODE_TCP, str(port)], stdout=subprocess.PIPE, text=True, env=env)
    assert node.stdout is not None
    node.stdout.readline()
    s = FrameStream.connect(f"127.0.0.1:{port}")
    times = []
    try:
        for i in range(repeats + 1):
            msg, _ = _frame(i)
            t0 = time.perf_counter()
            s.send(msg)
            reply = s.recv(30.0)
            if i:
                times.append(time.perf_counter() - t0)
            assert reply.batch_index == i
    finally:
        s.close()
        node.wait(10)
    return {"round_trip_s": round(statistics.median(times), 5), "spread_s": round(max(times) - min(times), 5)}


def bench_mqtt(broker_url: str, repeats: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    node = subprocess.Popen([sys.executable, "-c", NODE_MQTT, broker_url, UP, DOWN], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert node.stdout is not None
    node.stdout.readline()
    c = MqttClient(broker_url, MqttConfig("bench-owner", keepalive_s=30))
    c.connect()
    c.subscribe(DOWN, qos=1)
    r = Reassembler(30.0, 64 << 20)
    times = []
    try:
        for i in range(repeats + 1):
            msg, _ = _frame(i)
            t0 = time.perf_counter()
            for chunk in chunk_frame(encode_split(msg), f"fwd{i}"):
                c.publish(UP, chunk, qos=1, wait_s=30)
            frame = None
            while frame is None:
                ev = c.get(30.0)
                if ev is None:
                    raise TimeoutError("bench: no reply over MQTT within 30 s")
                if isinstance(ev, Message):
                    frame = r.feed("node", ev.payload)
            reply = decode_split(frame, source="node")
            if i:
                times.append(time.perf_counter() - t0)
            assert reply.batch_index == i
    finally:
        c.close()
        node.terminate()
        node.wait(10)
    return {"round_trip_s": round(statistics.median(times), 5), "spread_s": round(max(times) - min(times), 5)}


def _cpu_s(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(repeats: int = 20) -> dict[str, Any]:
    _, nbytes = _frame(0)
    out: dict[str, Any] = {"frame_bytes": nbytes, "shape": list(SHAPE), "repeats": repeats,
                           "chunk_bytes": DEFAULT_CHUNK_BYTES, "tcp": bench_tcp(repeats)}
    with MosquittoBroker(binary=find_mosquitto()) as broker:
        pid = broker._proc.pid if broker._proc is not None else None
        cpu0 = _cpu_s(pid)
        out["mqtt_mosquitto_qos1"] = bench_mqtt(broker.url, repeats)
        # The broker's own CPU per batch: a shared hop every owner's per-batch traffic would load.
        cpu_ms = (_cpu_s(pid) - cpu0) / (repeats + 1) * 1e3
        out["mqtt_mosquitto_qos1"]["broker_cpu_ms_per_round_trip"] = round(cpu_ms, 3)
    out["mqtt_over_tcp"] = round(out["mqtt_mosquitto_qos1"]["round_trip_s"] / out["tcp"]["round_trip_s"], 2)
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
