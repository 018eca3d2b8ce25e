"""runtime.mqtt against real brokers: the embedded amqtt child process and mosquitto.

Every broker test runs on both (mosquitto skips where absent, fails under
ORCHARD_REQUIRE_MOSQUITTO=1). Waits are "until this event, at most N s", never timings.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime.errors import ConfigError, TransportError
from runtime.mqtt import (
    BrokerUrl,
    Connected,
    Disconnected,
    Event,
    Message,
    MqttClient,
    MqttConfig,
    Will,
    parse_broker_url,
)
from testbed.broker import AmqttBroker, Broker, MosquittoBroker, free_port, port_accepts

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 20.0  # upper bound for any single wait; only reached when something is broken


@pytest.fixture(params=["amqtt", "mosquitto"])
def broker(request: pytest.FixtureRequest) -> Iterator[AmqttBroker | MosquittoBroker]:
    b: AmqttBroker | MosquittoBroker
    if request.param == "mosquitto":
        b = MosquittoBroker(binary=request.getfixturevalue("mosquitto_bin"))
    else:
        b = AmqttBroker()
    with b:
        yield b
    assert not b.running


@pytest.fixture
def make_client(broker: Broker) -> Iterator[Callable[..., MqttClient]]:
    made: list[MqttClient] = []

    def make(client_id: str, connect: bool = True, **kw: object) -> MqttClient:
        kw.setdefault("keepalive_s", 5)
        kw.setdefault("reconnect_min_s", 1)
        kw.setdefault("reconnect_max_s", 1)
        c = MqttClient(broker.url, MqttConfig(client_id, **kw))  # type: ignore[arg-type]
        made.append(c)
        if connect:
            c.connect()
        return c

    yield make
    for c in made:
        c.close()


def wait_for(client: MqttClient, match: Callable[[Event], bool], what: str, timeout_s: float = WAIT_S) -> Event:
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while (left := deadline - time.monotonic()) > 0:
        ev = client.get(left)
        if ev is not None and match(ev):
            return ev
        if ev is not None:
            seen.append(type(ev).__name__)
    pytest.fail(f"{client.client_id}: no {what} within {timeout_s:g} s (saw {seen})")


def wait_message(client: MqttClient, topic: str, payload: bytes | None = None) -> Message:
    ev = wait_for(
        client,
        lambda e: isinstance(e, Message) and e.topic == topic and (payload is None or e.payload == payload),
        f"message on {topic}" + (f" = {payload!r}" if payload is not None and len(payload) < 64 else ""),
    )
    assert isinstance(ev, Message)
    return ev


def test_roundtrip_qos1(make_client: Callable[..., MqttClient]) -> None:
    sub, pub = make_client("rt-sub"), make_client("rt-pub")
    sub.subscribe("orchard/t/dev/7/update", qos=1)
    ticket = pub.publish("orchard/t/dev/7/update", b"\x00weights\xff", qos=1, wait_s=WAIT_S)
    assert ticket.acked
    msg = wait_message(sub, "orchard/t/dev/7/update")
    assert (msg.payload, msg.qos, msg.retain) == (b"\x00weights\xff", 1, False)


def test_retained_message_reaches_late_subscriber(make_client: Callable[..., MqttClient]) -> None:
    pub = make_client("ret-pub")
    pub.publish("orchard/t/server/state", b'{"version": 3}', qos=1, retain=True, wait_s=WAIT_S)
    late = make_client("ret-late")
    late.subscribe("orchard/t/server/#", qos=1)
    msg = wait_message(late, "orchard/t/server/state")
    assert msg.payload == b'{"version": 3}' and msg.retain


CHILD = """
import sys, time
from runtime.mqtt import MqttClient, MqttConfig, Will
url, cid, topic = sys.argv[1:4]
c = MqttClient(url, MqttConfig(cid, keepalive_s=2, will=Will(topic, b"offline", qos=1, retain=True)))
c.connect()
c.publish(topic, b"online", qos=1, retain=True, wait_s=10)
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["sigkill", "sigstop"])
def test_last_will_fires_when_device_dies_or_freezes(
    broker: Broker, make_client: Callable[..., MqttClient], how: signal.Signals
) -> None:
    # SIGKILL: the kernel closes the socket. SIGSTOP: the socket stays open and silent, as in a
    # frozen cgroup, so only the broker's keepalive check (1.5 x 2 s) can notice.
    topic = f"orchard/t/dev/lwt-{how.name}/status"
    watcher = make_client("lwt-watch")
    watcher.subscribe(topic, qos=1)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, broker.url, f"lwt-{how.name}", topic], env=env)
    try:
        wait_message(watcher, topic, b"online")
        os.kill(child.pid, how)
        msg = wait_message(watcher, topic, b"offline")
        assert msg.qos == 1
    finally:
        child.kill()
        child.wait()
    late = make_client("lwt-late")  # the will was retained, so a newcomer sees "offline" too
    late.subscribe(topic)
    assert wait_message(late, topic).payload == b"offline"


def test_10mb_payload_arrives_intact(make_client: Callable[..., MqttClient]) -> None:
    payload = os.urandom(10 * 1024 * 1024)
    sub, pub = make_client("big-sub", keepalive_s=10), make_client("big-pub", keepalive_s=10)
    sub.subscribe("orchard/t/dev/1/update", qos=1)
    pub.publish("orchard/t/dev/1/update", payload, qos=1, wait_s=60)
    msg = wait_message(sub, "orchard/t/dev/1/update")
    assert len(msg.payload) == len(payload)
    assert hashlib.sha256(msg.payload).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_clients_reconnect_and_resubscribe_after_broker_restart(
    broker: AmqttBroker | MosquittoBroker, make_client: Callable[..., MqttClient]
) -> None:
    sub, pub = make_client("rs-sub"), make_client("rs-pub")
    sub.subscribe("orchard/t/dev/+/hello", qos=1)
    port = broker.port
    broker.kill()  # crash, not a clean shutdown
    for c in (sub, pub):
        wait_for(c, lambda e: isinstance(e, Disconnected), "Disconnected")
    broker.start()
    assert broker.port == port
    for c in (sub, pub):
        ev = wait_for(c, lambda e: isinstance(e, Connected), "Connected after restart")
        assert isinstance(ev, Connected) and ev.reconnect
    # The re-SUBSCRIBE and this PUBLISH travel on different connections, so the broker may see
    # the publish first: repeat it until one arrives (bounded by WAIT_S).
    deadline = time.monotonic() + WAIT_S
    got: Event | None = None
    while got is None and time.monotonic() < deadline:
        pub.publish("orchard/t/dev/3/hello", b"hi again", qos=1, wait_s=WAIT_S)
        got = sub.get(0.5)
        while got is not None and not isinstance(got, Message):
            got = sub.get(0.5)
    assert isinstance(got, Message) and got.topic == "orchard/t/dev/3/hello" and got.payload == b"hi again"


def test_publish_while_broker_down_qos0_raises_qos1_is_queued(
    broker: AmqttBroker | MosquittoBroker, make_client: Callable[..., MqttClient]
) -> None:
    """The documented behaviour (runtime/mqtt.py): QoS 0 raises; QoS 1 is queued, its ticket
    raises TransportError until the broker is back, then it is delivered."""
    dev = make_client("down-dev")
    broker.kill()
    wait_for(dev, lambda e: isinstance(e, Disconnected), "Disconnected")
    with pytest.raises(TransportError, match=r"down-dev.*mqtt://127\.0\.0\.1.*QoS 0"):
        dev.publish("orchard/t/dev/9/telemetry", b"{}", qos=0)
    ticket = dev.publish("orchard/t/dev/9/status", b"training", qos=1, retain=True)
    with pytest.raises(TransportError, match="not acknowledged"):
        ticket.wait(0.3)  # the broker is down: no PUBACK can come
    broker.start()
    ticket.wait(WAIT_S)  # delivered after the automatic reconnect
    # Retained, so whoever subscribes after the broker came back sees it whatever the order.
    late = make_client("down-late")
    late.subscribe("orchard/t/dev/9/status")
    assert wait_message(late, "orchard/t/dev/9/status").payload == b"training"


def test_stop_leaves_nothing_behind(broker: AmqttBroker | MosquittoBroker) -> None:
    pid = broker._proc.pid if broker._proc else None
    assert pid is not None and port_accepts(broker.host, broker.port)
    broker.stop()
    assert not port_accepts(broker.host, broker.port)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_mqtt_v5_roundtrip_and_will_on_mosquitto(mosquitto_bin: str) -> None:
    # v5 is an option only because this test covers it; amqtt refuses protocol level 5.
    with MosquittoBroker(binary=mosquitto_bin) as b:
        will = Will("orchard/t/dev/v5/status", b"offline")
        sub = MqttClient(b.url, MqttConfig("v5-sub", protocol="5", keepalive_s=5))
        pub = MqttClient(b.url, MqttConfig("v5-pub", protocol="5", keepalive_s=5, will=will))
        with sub, pub:
            sub.subscribe("orchard/t/#", qos=1)
            pub.publish("orchard/t/x", b"v5", qos=1, wait_s=WAIT_S)
            assert wait_message(sub, "orchard/t/x").payload == b"v5"


def test_connect_to_nothing_raises_transport_error_naming_client_and_url() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    c = MqttClient(url, MqttConfig("lonely", connect_timeout_s=2))
    with pytest.raises(TransportError, match=r"'lonely'.*mqtt://127\.0\.0\.1:\d+.*code"):
        c.connect()
    with pytest.raises(TransportError, match="lonely"):
        c.publish("t", b"x")


@pytest.mark.parametrize(
    "bad",
    ["", "127.0.0.1:1883", "http://host:1883", "mqtt://", "mqtt://host:notaport", "mqtt://host:70000",
     "mqtt://host:1883/path", "mqtt://host?x=1"],
)
def test_bad_broker_url_is_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="broker URL"):
        parse_broker_url(bad)
    with pytest.raises(ConfigError):
        MqttClient(bad, MqttConfig("x"))


def test_broker_url_parsing() -> None:
    assert parse_broker_url("mqtt://127.0.0.1") == BrokerUrl("mqtt", "127.0.0.1", 1883)
    u = parse_broker_url("mqtts://dev%407:s3cret@broker.lan:9000")
    assert (u.scheme, u.host, u.port, u.username, u.password, u.tls) == (
        "mqtts", "broker.lan", 9000, "dev@7", "s3cret", True)
    assert "s3cret" not in str(u) and "s3cret" not in repr(u)


@pytest.mark.integration
def test_connect_replays_only_own_retained_messages(broker):
    """amqtt 0.12.1 quirk 6: a new client must not get retained messages matching someone else's filter."""
    url = broker.url
    watcher = MqttClient(url, MqttConfig(client_id="watcher"))
    watcher.connect()
    watcher.subscribe("r/dev/+/+")  # like the server
    publisher = MqttClient(url, MqttConfig(client_id="pub"))
    publisher.connect()
    publisher.publish("r/dev/other/status", b"idle", qos=1, retain=True, wait_s=5)
    late = MqttClient(url, MqttConfig(client_id="late"))
    late.connect()
    late.subscribe("r/dev/late/task")
    late.subscribe("r/dev/other/status")  # its own filter: this retained message must arrive
    got = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        ev = late.get(timeout_s=0.1)
        if isinstance(ev, Message):
            got.append(ev.topic)
    for c in (watcher, publisher, late):
        c.close()
    assert got == ["r/dev/other/status"]
