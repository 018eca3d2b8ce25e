"""The real update path, device -> broker -> server, for a 10 MB update, vs raw loopback TCP.

What one `update_path_s` figure includes, on CLOCK_MONOTONIC (system-wide on Linux, so the
device's and the server's stamps compare):
  from the device holding its encoded update frame (`encode_update`, not timed: training's
  output), through seal (`runtime.seal.seal`), the outbox's send (`runtime.outbox.Outbox`:
  chunking, one QoS-q publish per chunk, as the agent does), the broker, the server's MQTT
  client, reassembly (`runtime.chunks.Reassembler`), open (`open_sealed`, MAC checked) and
  decode (`decode_update`, every value checked), to a decoded `Update` in the server's hands.
The device is its own process (its paho thread must not share the server's GIL, as on a real
testbed). CPU per round: `device_cpu_ms` (process_time of the device process), `server_cpu_ms`
(this process: its paho thread and the receive path), `broker_cpu_ms` (/proc utime + stime).

The physical reference, `raw_tcp_s`: the same number of bytes (the sealed frame) written into
a loopback TCP socket by a second process until this process has read all of them into one
buffer and answered one byte. `raw_tcp_cpu_ms`: both ends' CPU.

Every configuration (broker x chunk size x chunk QoS) and the raw reference run once per
repeat, interleaved, so host load hits them alike; medians over repeats. `update_over_raw`
is raw_tcp_s / update_path_s: the issue's ">= 70% of raw TCP" asks for >= 0.7.
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

from bench.transport_ceiling import PlainPaho, RawTcp, RelayTcp, chunk_sizes, proc_cpu_ms
from runtime.chunks import Reassembler
from runtime.errors import OrchardError
from runtime.frames import decode_update
from runtime.mqtt import Message, MqttClient, MqttConfig, parse_broker_url
from runtime.seal import open_sealed
from testbed.broker import Broker

REPO_ROOT = Path(__file__).resolve().parents[1]
UPDATE_PARAMS = 10 * 1024 * 1024 // 4  # one float32 tensor: a 10 MB update body
KEY = bytes(range(32))
RUN_ID = "bench"
DEVICE_ID = "dev1"
WAIT_S = 120.0

# The device: encodes one update once, then on "go <chunk_bytes> <qos> <round> <sealing>" seals and
# sends it exactly as runtime/agent.py does (Outbox.add, Outbox.send sealing as it chunks: "stream"),
# or as it did before (seal, then chunk_frame: "whole"), and reports its stamps.
DEVICE = """
import json, sys, time
import numpy as np
from runtime.frames import encode_update
from runtime.mqtt import MqttClient, MqttConfig
from runtime.outbox import Outbox
from runtime.protocol import Update
from runtime.chunks import chunk_frame, chunk_sealed
from runtime.protocol import Receipt
from runtime.seal import MAC_BYTES, seal, seal_head
url, topic, n_params = sys.argv[1], sys.argv[2], int(sys.argv[3])
login = json.loads(sys.stdin.readline())  # a lab's login and CA on stdin, never on the command line
key = bytes(range(32))
rng = np.random.default_rng(0)
update = Update(task_id="t0", device_id="dev1", base_version=0, n_samples=32, train_s=1.0,
                peak_rss_mb=1.0, energy_j=None, kind="delta",
                tensors={"w": rng.standard_normal(n_params).astype(np.float32)})
encoded = encode_update(update)
head = seal_head(len(encoded), key=key, run_id="bench", device_id="dev1", kind="update")[0]
sealed_len = len(head) + len(encoded) + MAC_BYTES
c = MqttClient(url, MqttConfig("bench-update-device", keepalive_s=60, **login))
c.connect()
qos_now = [1]
tickets = []
outbox = Outbox(lambda chunk: tickets.append(c.publish(topic, chunk, qos=qos_now[0])),
                chunks=lambda frame, msg_id, size: chunk_sealed(frame, key=key, run_id="bench", device_id="dev1",
                                                                kind="update", msg_id=msg_id, chunk_bytes=size))
print(json.dumps({"encoded_bytes": len(encoded)}), flush=True)
for line in sys.stdin:
    words = line.split()
    if not words or words[0] != "go":
        break
    chunk_bytes, qos_now[0], task, sealing = int(words[1]), int(words[2]), words[3], words[4]
    outbox.chunk_bytes = chunk_bytes
    tickets.clear()
    cpu0, t0 = time.process_time(), time.monotonic()
    if sealing == "stream":
        outbox.add(task, encoded)
        outbox.send(task)
    else:  # "whole": the path before streaming, for the A/B: seal the frame, then chunk it
        for chunk in chunk_frame(seal(encoded, key=key, run_id="bench", device_id="dev1", kind="update"),
                                 f"{task}.1", chunk_bytes):
            tickets.append(c.publish(topic, chunk, qos=qos_now[0]))
    t_sent = time.monotonic()
    for t in tickets:
        t.wait(120)
    t_acked = time.monotonic()
    outbox.settle(Receipt("dev1", task, True))
    print(json.dumps({"t0": t0, "t_sent": t_sent, "t_acked": t_acked, "sealed_bytes": sealed_len,
                      "chunks": len(tickets), "cpu_ms": (time.process_time() - cpu0) * 1000}), flush=True)
c.close()
"""

class UpdateLink:
    """One broker: a device process publishing updates, this process receiving them as the server does."""

    def __init__(self, broker: Broker, n_params: int, login: dict[str, Any] | None = None) -> None:
        self.broker = broker
        self.topic = f"orchard/bench/dev/{DEVICE_ID}/update"
        login = login or {}
        self.server = MqttClient(broker.url, MqttConfig("bench-update-server", keepalive_s=60, **login))
        self.server.connect()
        self.server.subscribe(self.topic, qos=1)
        self.reassembler = Reassembler(timeout_s=60.0, max_bytes=512 * 1024 * 1024)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.device = subprocess.Popen([sys.executable, "-c", DEVICE, broker.url, self.topic, str(n_params)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self.device.stdout is not None and self.device.stdin is not None
        self.device.stdin.write(json.dumps(login) + "\n")
        self.device.stdin.flush()
        self.encoded_bytes = json.loads(self.device.stdout.readline())["encoded_bytes"]
        self._round = 0

    def once(self, chunk_bytes: int, qos: int, sealing: str = "stream") -> dict[str, Any]:
        assert self.device.stdin is not None and self.device.stdout is not None
        self._round += 1
        broker_pid = getattr(self.broker, "pid", None)
        broker0 = proc_cpu_ms(broker_pid) if broker_pid else 0.0
        cpu0 = time.process_time()
        self.device.stdin.write(f"go {chunk_bytes} {qos} t{self._round} {sealing}\n")
        self.device.stdin.flush()
        deadline = time.monotonic() + WAIT_S
        update = None
        while update is None:
            ev = self.server.get(deadline - time.monotonic())
            if ev is None:
                raise OrchardError(f"bench: no update through {self.broker.url} within {WAIT_S:g} s")
            if not isinstance(ev, Message) or ev.topic != self.topic:
                continue
            frame = self.reassembler.feed(ev.topic, ev.payload, mac_key=KEY if sealing == "stream" else None)
            if frame is not None:  # the server's own three steps (server/service.py)
                opened = open_sealed(frame, key=KEY, run_id=RUN_ID, device_id=DEVICE_ID, kind="update")
                update = decode_update(opened.payload, source=DEVICE_ID)
        t_end = time.monotonic()
        server_cpu = (time.process_time() - cpu0) * 1000
        stamps = json.loads(self.device.stdout.readline())
        return {
            "update_path_s": t_end - stamps["t0"],
            "publish_return_s": stamps["t_sent"] - stamps["t0"],
            "all_pubacks_s": stamps["t_acked"] - stamps["t0"],
            "device_cpu_ms": stamps["cpu_ms"],
            "server_cpu_ms": server_cpu,
            "broker_cpu_ms": (proc_cpu_ms(broker_pid) - broker0) if broker_pid else None,
            "chunks": stamps["chunks"],
            "sealed_bytes": stamps["sealed_bytes"],
            "intact": bool(update.tensors["w"].shape == (UPDATE_PARAMS,)),
        }

    def close(self) -> None:
        assert self.device.stdin is not None
        self.device.stdin.close()
        self.device.wait(timeout=30)
        self.server.close()


def steps_cpu(n_params: int = UPDATE_PARAMS, repeats: int = 9) -> dict[str, Any]:
    """CPU ms (process time, median of `repeats`) of each step of the path, without MQTT.
    Device: `sealed_chunks_ms`, what the agent's outbox runs (chunk_sealed: the MAC fed chunk by
    chunk, one copy per chunk), next to the two passes it replaces, `seal_ms` (seal) and `chunk_ms`
    (chunk_frame of the sealed frame). Server: `reassemble_ms` (every chunk through
    Reassembler.feed, with the device's key, so the MAC is computed there), `open_ms` (open_sealed
    of that frame: compares the MAC it carries), `decode_ms` (decode_update of the Opened frame) and
    `receive_ms`, the three together; `reassemble_plain_ms` / `open_full_ms`: the same without the
    key, where open_sealed hashes the whole frame itself."""
    from runtime.chunks import chunk_frame, chunk_sealed
    from runtime.frames import encode_update
    from runtime.protocol import Update
    from runtime.seal import seal

    rng = np.random.default_rng(0)
    update = Update(task_id="t0", device_id=DEVICE_ID, base_version=0, n_samples=32, train_s=1.0,
                    peak_rss_mb=1.0, energy_j=None, kind="delta",
                    tensors={"w": rng.standard_normal(n_params).astype(np.float32)})
    encoded = encode_update(update)
    sealing = {"key": KEY, "run_id": RUN_ID, "device_id": DEVICE_ID, "kind": "update"}
    sealed = seal(encoded, **sealing)
    chunks = list(chunk_sealed(encoded, **sealing, msg_id="m1"))
    assert chunks == chunk_frame(sealed, "m1")  # the same bytes on the wire either way

    def reassemble(mac_key: bytes | None) -> memoryview:
        r = Reassembler(timeout_s=60.0, max_bytes=512 * 1024 * 1024)
        frames = [f for f in (r.feed(DEVICE_ID, c, mac_key=mac_key) for c in chunks) if f is not None]
        return frames[0]

    def opened(frame: memoryview) -> Any:
        return open_sealed(frame, key=KEY, run_id=RUN_ID, device_id=DEVICE_ID, kind="update")

    plain_frame = reassemble(None)
    decoded_from = opened(plain_frame)
    steps: dict[str, Any] = {
        "sealed_chunks_ms": lambda: list(chunk_sealed(encoded, **sealing, msg_id="m1")),
        "seal_ms": lambda: seal(encoded, **sealing),
        "chunk_ms": lambda: chunk_frame(sealed, "m1"),
        "reassemble_plain_ms": lambda: reassemble(None),
        "open_full_ms": lambda: opened(plain_frame),
        "decode_ms": lambda: decode_update(decoded_from, source=DEVICE_ID),
        "receive_ms": lambda: decode_update(opened(reassemble(KEY)), source=DEVICE_ID),
    }
    out: dict[str, Any] = {}
    for name, step in steps.items():
        times = []
        for _ in range(repeats):
            cpu0 = time.process_time()
            step()
            times.append((time.process_time() - cpu0) * 1000)
        out[name] = round(statistics.median(times), 2)
    split: dict[str, list[float]] = {"reassemble_ms": [], "open_ms": []}
    for _ in range(repeats):  # the streamed receive's two halves: the open needs this reassembly's frame
        cpu0 = time.process_time()
        frame = reassemble(KEY)
        cpu1 = time.process_time()
        opened(frame)
        split["reassemble_ms"].append((cpu1 - cpu0) * 1000)
        split["open_ms"].append((time.process_time() - cpu1) * 1000)
    out.update({k: round(statistics.median(v), 2) for k, v in split.items()})
    out.update(sealed_bytes=len(sealed), chunks=len(chunks), repeats=repeats,
               loadavg_1m=round(os.getloadavg()[0], 2))
    return out


def _median(rows: list[dict[str, Any]], key: str, digits: int = 4) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), digits) if values else None


def measure(brokers: dict[str, Broker], configs: list[tuple[str, int, int, str]], repeats: int,
            n_params: int = UPDATE_PARAMS, logins: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """configs: (broker name, chunk bytes, chunk QoS, sealing "stream" or "whole"). One warm-up round
    each, then `repeats`.
    `logins`: per broker name, the MqttConfig login fields (username, password, ca_file) both ends use.
    A broker without a login also gets the plain-paho ceiling (bench/transport_ceiling.py) per config."""
    links = {name: UpdateLink(b, n_params, (logins or {}).get(name)) for name, b in brokers.items()}
    rows: dict[tuple[str, int, int, str], list[dict[str, Any]]] = {c: [] for c in configs}
    raw_rows: list[tuple[float, float]] = []
    relay_rows: list[tuple[float, float]] = []
    loads: list[float] = []
    plains: dict[tuple[str, int], PlainPaho] = {}
    try:
        sealed = next(iter(links.values())).once(configs[0][1], configs[0][2])["sealed_bytes"]
        for name, chunk_bytes, _qos, _sealing in configs:
            if name not in (logins or {}) and (name, chunk_bytes) not in plains:
                url = parse_broker_url(brokers[name].url)
                plains[name, chunk_bytes] = PlainPaho(url.host, url.port, chunk_sizes(sealed, chunk_bytes),
                                                      getattr(brokers[name], "pid", None), f"plain-{chunk_bytes}")
        raw, relay = RawTcp(sealed), RelayTcp(sealed)
        try:
            for c in configs:
                links[c[0]].once(c[1], c[2], c[3])  # warm-up
                if (c[0], c[1]) in plains:
                    plains[c[0], c[1]].once(c[2])
            for _ in range(repeats):
                loads.append(os.getloadavg()[0])
                raw_rows.append(raw.once())
                relay_rows.append(relay.once())
                for c in configs:
                    row = links[c[0]].once(c[1], c[2], c[3])
                    if (c[0], c[1]) in plains:
                        row.update(plains[c[0], c[1]].once(c[2]))
                    rows[c].append(row)
        finally:
            raw.close()
            relay.close()
    finally:
        for link in links.values():
            link.close()
        for plain in plains.values():
            plain.close()
    raw_s = statistics.median(r[0] for r in raw_rows)
    relay_s = statistics.median(r[0] for r in relay_rows)
    out: dict[str, Any] = {
        "update_params": n_params,
        "sealed_bytes": sealed,
        "repeats": repeats,
        "loadavg_1m": round(statistics.median(loads), 2),
        "raw_tcp_s": round(raw_s, 4),
        "raw_tcp_spread_s": round(max(r[0] for r in raw_rows) - min(r[0] for r in raw_rows), 4),
        "raw_tcp_cpu_ms": round(statistics.median(r[1] for r in raw_rows), 2),
        "relay_tcp_s": round(relay_s, 4),
        "relay_tcp_spread_s": round(max(r[0] for r in relay_rows) - min(r[0] for r in relay_rows), 4),
        "relay_cpu_ms": round(statistics.median(r[1] for r in relay_rows), 2),
        "relay_over_raw": round(raw_s / relay_s, 3),
        "configs": [],
    }
    for (name, chunk_bytes, qos, sealing), got in rows.items():
        med = statistics.median(r["update_path_s"] for r in got)
        plain_s = _median(got, "plain_paho_s")
        out["configs"].append({
            "broker": name, "chunk_bytes": chunk_bytes, "qos": qos, "sealing": sealing, "chunks": got[0]["chunks"],
            "update_path_s": round(med, 4),
            "spread_s": round(max(r["update_path_s"] for r in got) - min(r["update_path_s"] for r in got), 4),
            "update_over_raw": round(raw_s / med, 3),
            "update_over_relay": round(relay_s / med, 3),
            **{k: _median(got, k, 2 if k.endswith("_ms") else 4)
               for k in ("publish_return_s", "all_pubacks_s", "device_cpu_ms", "server_cpu_ms")},
            # /proc counts clock ticks (10 ms): a mean over the repeats resolves what one round cannot.
            "broker_cpu_ms": (round(statistics.mean(r["broker_cpu_ms"] for r in got), 1)
                              if got[0]["broker_cpu_ms"] is not None else None),
            "plain_paho_s": plain_s,
            "plain_over_raw": round(raw_s / plain_s, 3) if plain_s else None,
            "update_over_plain": round(plain_s / med, 3) if plain_s else None,
            **{k: _median(got, k, 2) for k in ("plain_device_cpu_ms", "plain_server_cpu_ms")},
            "plain_broker_cpu_ms": (round(statistics.mean(r["plain_broker_cpu_ms"] for r in got), 1)
                                    if got[0].get("plain_broker_cpu_ms") is not None else None),
            "intact": all(r["intact"] for r in got),
        })
        row = out["configs"][-1]
        # Every process's CPU per update: medians of the ends plus the broker's mean (ticks).
        for prefix in ("", "plain_"):
            parts = [row[f"{prefix}{k}_cpu_ms"] for k in ("device", "server", "broker")]
            row[f"{prefix}total_cpu_ms"] = round(sum(parts), 1) if None not in parts else None
    return out


if __name__ == "__main__":
    from testbed.broker import AmqttBroker, MosquittoBroker

    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    sizes = [int(x) for x in (sys.argv[2].split(",") if len(sys.argv) > 2 else ["262144"])]
    qoses = [int(x) for x in (sys.argv[3].split(",") if len(sys.argv) > 3 else ["1"])]
    names = sys.argv[4].split(",") if len(sys.argv) > 4 else ["mosquitto", "amqtt"]
    with MosquittoBroker() as mosq, AmqttBroker() as amqtt:
        chosen = {"mosquitto": mosq, "amqtt": amqtt}
        brokers = {n: chosen[n] for n in names}
        cfgs = [(n, cb, q, sealing) for n in names for cb in sizes for q in qoses for sealing in ("stream", "whole")]
        print(json.dumps(measure(brokers, cfgs, reps), indent=1))
