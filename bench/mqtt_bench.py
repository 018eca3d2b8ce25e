"""10 MB model update device -> server over MQTT (QoS 1), through amqtt and through mosquitto.

For each broker: the "device" is a separate process (as on a real testbed, so its paho thread
does not share a GIL with the server's) that publishes one 10 MB payload per round; the
"server" (this process) is subscribed. Per round we record
  * publish_to_puback_s:  device publish() -> PUBACK from the broker (the device's view),
  * publish_to_receipt_s: device publish() -> whole message in the server's event queue,
on CLOCK_MONOTONIC, which is system-wide on Linux, so the two processes' stamps compare.
The physical reference is a plain loopback TCP send of the same bytes until the reader has
all of them and answered one byte. Medians of `repeats` rounds.

`mosquitto_tls` is the same through mosquitto as a campaign serves it (a lab's logins, ACLs and
TLS; the device gets its login on stdin, never on its command line). `seal_10mb` is the cost of
binding an update to its run and device (runtime/seal.py: HMAC-SHA256 over the whole frame),
to seal and to open, next to the SHA-256 the frame already takes of its body.

`mac_10mb`: CPU per 10 MB of each MAC hashlib has (HMAC-SHA256, keyed BLAKE2b / BLAKE2s,
HMAC-SHA512) and of the chunks' CRC-32, on this host and with OpenSSL's SHA extensions masked.

`update_10mb` is the real update path (seal, chunks, broker, reassembly, open, decode) against
raw loopback TCP, a minimal relay (two hops) and plain paho through the same broker (the
ceiling: bench/transport_ceiling.py), swept over chunk size and chunk QoS: bench/update_path.py
says what each of its figures includes.

`run() -> dict` is what bench/run.py merges into bench.json; `python bench/mqtt_bench.py`
prints it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.update_path import DEVICE_ID, measure, steps_cpu
from runtime.chunks import DEFAULT_CHUNK_BYTES
from runtime.errors import OrchardError
from runtime.mqtt import Message, MqttClient, MqttConfig
from runtime.seal import open_sealed, seal
from testbed.broker import AmqttBroker, Broker, MosquittoBroker, find_mosquitto
from testbed.lab_secrets import Lab, provision

REPO_ROOT = Path(__file__).resolve().parents[1]
PAYLOAD_BYTES = 10 * 1024 * 1024
TOPIC = "orchard/bench/dev/1/update"
WAIT_S = 120.0

DEVICE = """
import hashlib, json, os, sys, time
from runtime.mqtt import MqttClient, MqttConfig
url, n_bytes = sys.argv[1], int(sys.argv[2])
login = json.loads(sys.stdin.readline())
payload = os.urandom(n_bytes)
c = MqttClient(url, MqttConfig("bench-device", keepalive_s=30, **login))
c.connect()
print(json.dumps({"sha256": hashlib.sha256(payload).hexdigest()}), flush=True)
for line in sys.stdin:
    if line.strip() != "go":
        break
    t0 = time.monotonic()
    c.publish(sys.argv[3], payload, qos=1, wait_s=120)
    print(json.dumps({"t_publish": t0, "t_puback": time.monotonic()}), flush=True)
c.close()
"""


def loopback_send_s(n_bytes: int) -> float:
    """Seconds to push n_bytes through a 127.0.0.1 TCP socket until the reader has them all."""
    data = os.urandom(n_bytes)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def reader() -> None:
            conn, _ = server.accept()
            with conn:
                buf = bytearray(n_bytes)
                view, got = memoryview(buf), 0
                while got < n_bytes:
                    got += conn.recv_into(view[got:])
                conn.sendall(b"k")

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        with socket.create_connection(("127.0.0.1", port)) as s:
            t0 = time.monotonic()
            s.sendall(data)
            s.recv(1)
            elapsed = time.monotonic() - t0
        t.join()
    return elapsed


def seal_cost(n_bytes: int, repeats: int = 5) -> dict[str, Any]:
    """CPU milliseconds (process time) to seal and to open an n-byte frame, and to SHA-256 it (what a
    frame pays anyway)."""
    frame, key = os.urandom(n_bytes), os.urandom(32)
    times: dict[str, list[float]] = {"seal_ms": [], "open_ms": [], "sha256_ms": []}
    for _ in range(repeats):
        t0 = time.process_time()
        sealed = seal(frame, key=key, run_id="bench", device_id="dev1", kind="update")
        t1 = time.process_time()
        open_sealed(sealed, key=key, run_id="bench", device_id="dev1", kind="update")
        t2 = time.process_time()
        hashlib.sha256(frame).digest()
        t3 = time.process_time()
        for name, dt in (("seal_ms", t1 - t0), ("open_ms", t2 - t1), ("sha256_ms", t3 - t2)):
            times[name].append(dt * 1000)
    out: dict[str, Any] = {k: round(statistics.median(v), 2) for k, v in times.items()}
    out.update(payload_bytes=n_bytes, repeats=repeats)
    return out


# Every MAC hashlib offers without a new native dependency (on CPython 3.8-3.12 as here), and the
# chunks' CRC-32; run twice, in fresh interpreters: as the host is, and with OpenSSL told the CPU
# has no SHA extensions (OPENSSL_ia32cap bit 29 of CPUID leaf 7 EBX), as on a Pi 4's Cortex-A72.
MAC_PROBE = """
import hashlib, hmac, json, os, statistics, sys, time, zlib
data, key, repeats = os.urandom(int(sys.argv[1])), os.urandom(32), int(sys.argv[2])
cases = {
    "hmac_sha256": lambda: hmac.new(key, data, hashlib.sha256).digest(),
    "blake2b_keyed": lambda: hashlib.blake2b(data, key=key, digest_size=32).digest(),
    "blake2s_keyed": lambda: hashlib.blake2s(data, key=key).digest(),
    "hmac_sha512": lambda: hmac.new(key, data, hashlib.sha512).digest(),
    "crc32": lambda: zlib.crc32(data),
}
out = {}
for _ in range(repeats):  # interleaved
    for name, case in cases.items():
        cpu0 = time.process_time()
        case()
        out.setdefault(name, []).append((time.process_time() - cpu0) * 1000)
print(json.dumps({k: round(statistics.median(v), 2) for k, v in out.items()}))
"""


def mac_cost(n_bytes: int, repeats: int = 9) -> dict[str, Any]:
    """CPU ms per `n_bytes` of each MAC candidate (MAC_PROBE), with and without SHA extensions."""
    has_sha_ni = " sha_ni" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    out: dict[str, Any] = {"payload_bytes": n_bytes, "repeats": repeats, "host_sha_ni": has_sha_ni,
                           "loadavg_1m": round(os.getloadavg()[0], 2)}
    for name, extra in (("host", {}), ("no_sha_extensions", {"OPENSSL_ia32cap": ":~0x20000000"})):
        proc = subprocess.run([sys.executable, "-c", MAC_PROBE, str(n_bytes), str(repeats)], capture_output=True,
                              text=True, check=True, env={**os.environ, **extra})
        out[name] = json.loads(proc.stdout)
    return out


def bench_broker(broker: Broker, repeats: int, n_bytes: int, lab: Lab | None = None) -> dict[str, Any]:
    ca = str(lab.tls.ca_file) if lab is not None and lab.tls is not None else None
    server_login = ({"username": lab.server.username, "password": lab.server.password, "ca_file": ca}
                    if lab is not None else {})
    device_login = ({"username": lab.server.username, "password": lab.server.password, "ca_file": ca}
                    if lab is not None else {})  # the bench's topic is outside the devices' ACLs
    server = MqttClient(broker.url, MqttConfig("bench-server", keepalive_s=30, **server_login))
    server.connect()
    server.subscribe(TOPIC, qos=1)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    device = subprocess.Popen(
        [sys.executable, "-c", DEVICE, broker.url, str(n_bytes), TOPIC],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    assert device.stdin is not None and device.stdout is not None
    device.stdin.write(json.dumps(device_login) + "\n")
    device.stdin.flush()
    puback, receipt, intact = [], [], True
    try:
        sha = json.loads(device.stdout.readline())["sha256"]
        for _ in range(repeats):
            device.stdin.write("go\n")
            device.stdin.flush()
            deadline = time.monotonic() + WAIT_S
            msg = None
            while msg is None and time.monotonic() < deadline:
                ev = server.get(deadline - time.monotonic())
                if isinstance(ev, Message) and ev.topic == TOPIC:
                    msg = ev
            t_receipt = time.monotonic()
            if msg is None:
                raise OrchardError(f"bench: no 10 MB message through {broker.url} within {WAIT_S:g} s")
            stamps = json.loads(device.stdout.readline())
            intact &= hashlib.sha256(msg.payload).hexdigest() == sha
            puback.append(stamps["t_puback"] - stamps["t_publish"])
            receipt.append(t_receipt - stamps["t_publish"])
    finally:
        device.stdin.close()
        device.wait(timeout=30)
        server.close()
    med = statistics.median(receipt)
    return {
        "publish_to_puback_s": round(statistics.median(puback), 4),
        "publish_to_receipt_s": round(med, 4),
        "throughput_MBps": round(n_bytes / med / 1e6, 1),
        "intact": intact,
    }


# (chunk bytes, chunk QoS) per broker: the default first, then the sweep around it.
# "whole": the same update sealed whole, then chunked (the path before streaming), for the A/B.
UPDATE_CONFIGS = ((DEFAULT_CHUNK_BYTES, 1, "stream"), (DEFAULT_CHUNK_BYTES, 1, "whole"), (64 * 1024, 1, "stream"),
                  (1024 * 1024, 1, "stream"), (4 * 1024 * 1024, 1, "stream"), (DEFAULT_CHUNK_BYTES, 0, "stream"))


def update_path(repeats: int) -> dict[str, Any]:
    """The real update path through each broker there is (bench/update_path.py): amqtt and
    mosquitto swept over UPDATE_CONFIGS; `mosquitto_tls`, mosquitto as a campaign serves it (a
    lab's logins, ACLs and TLS: what `kind = "auto"` picks when mosquitto is installed), and
    `amqtt_lab`, amqtt with the same lab's logins and ACLs (amqtt has no TLS), at the default chunks."""
    with contextlib.ExitStack() as stack:
        brokers: dict[str, Broker] = {"amqtt": stack.enter_context(AmqttBroker())}
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        lab = provision(tmp, "orchard/bench", [DEVICE_ID], tls=True)
        server_login = {"username": lab.server.username, "password": lab.server.password}
        brokers["amqtt_lab"] = stack.enter_context(AmqttBroker(lab=lab))
        logins = {"amqtt_lab": server_login}
        with contextlib.suppress(OrchardError):  # no mosquitto: mqtt_10mb reports it as skipped
            binary = find_mosquitto()
            brokers["mosquitto"] = stack.enter_context(MosquittoBroker(binary=binary))
            brokers["mosquitto_tls"] = stack.enter_context(MosquittoBroker(binary=binary, lab=lab))
            assert lab.tls is not None
            logins["mosquitto_tls"] = {**server_login, "ca_file": str(lab.tls.ca_file)}
        configs = [(name, chunk, qos, sealing) for name in ("amqtt", "mosquitto") if name in brokers
                   for chunk, qos, sealing in UPDATE_CONFIGS]
        configs += [(name, DEFAULT_CHUNK_BYTES, 1, "stream") for name in ("amqtt_lab", "mosquitto_tls")
                    if name in brokers]
        return measure(brokers, configs, repeats, logins=logins)


def run(repeats: int = 3, n_bytes: int = PAYLOAD_BYTES) -> dict[str, Any]:
    result: dict[str, Any] = {
        "payload_bytes": n_bytes,
        "qos": 1,
        "repeats": repeats,
        "loopback_socket_s": round(statistics.median(loopback_send_s(n_bytes) for _ in range(repeats)), 4),
    }
    with AmqttBroker() as amqtt:
        result["amqtt"] = bench_broker(amqtt, repeats, n_bytes)
    try:
        binary = find_mosquitto()
    except OrchardError as exc:
        result["mosquitto"] = {"skipped": str(exc)}
    else:
        with MosquittoBroker(binary=binary) as mosq:
            result["mosquitto"] = bench_broker(mosq, repeats, n_bytes)
        with tempfile.TemporaryDirectory() as tmp:
            lab = provision(Path(tmp), "orchard/bench", ["dev1"], tls=True)
            with MosquittoBroker(binary=binary, lab=lab) as mosq:
                result["mosquitto_tls"] = bench_broker(mosq, repeats, n_bytes, lab)
    return {"mqtt_10mb": result, "seal_10mb": seal_cost(n_bytes), "mac_10mb": mac_cost(n_bytes),
            "update_10mb": update_path(max(5, repeats)),
            "update_steps_10mb": steps_cpu()}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
