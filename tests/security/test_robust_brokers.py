"""Both brokers cap the size of one MQTT packet (before: amqtt relayed a 200 MB message): a
bigger publish is not delivered and its sender is disconnected; smaller ones pass."""

from __future__ import annotations

import contextlib
import time
import uuid

import pytest

from runtime.errors import TransportError
from runtime.mqtt import Message, MqttClient, MqttConfig
from testbed.broker import MAX_PACKET_BYTES, AmqttBroker, Broker, MosquittoBroker

pytestmark = pytest.mark.integration
CAP = 1 << 20


def client(broker: Broker) -> MqttClient:
    c = MqttClient(broker.url, MqttConfig(f"cap-{uuid.uuid4().hex[:6]}", keepalive_s=5))
    c.connect()
    return c


def received(sub: MqttClient, within_s: float) -> list[int]:
    sizes, deadline = [], time.monotonic() + within_s
    while time.monotonic() < deadline:
        ev = sub.get(0.1)
        if isinstance(ev, Message):
            sizes.append(len(ev.payload))
    return sizes


@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
def test_a_publish_over_the_packet_cap_is_not_relayed(kind: str, request: pytest.FixtureRequest) -> None:
    broker: Broker = (MosquittoBroker(binary=request.getfixturevalue("mosquitto_bin"), max_packet_bytes=CAP)
                      if kind == "mosquitto" else AmqttBroker(max_packet_bytes=CAP))
    with broker:
        sub = client(broker)
        sub.subscribe("cap/#", qos=1)
        big = client(broker)
        # The broker may close the connection before the PUBACK: that is the refusal.
        with contextlib.suppress(TransportError):
            big.publish("cap/big", b"x" * (2 * CAP), qos=1, wait_s=3)
        small = client(broker)
        small.publish("cap/small", b"y" * (CAP // 2), qos=1, wait_s=10)
        assert received(sub, 2.0) == [CAP // 2]
        for c in (sub, big, small):
            c.close()
    assert MAX_PACKET_BYTES == 64 * 1024 * 1024  # the default of both brokers
