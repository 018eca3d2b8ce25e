"""A SUBACK that does not come in time (the process, or here the broker, was stopped meanwhile)
leaves the subscription registered, which is what lets a device frozen during start-up go on
instead of exiting (runtime/agent.py)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from runtime.errors import TransportError
from runtime.mqtt import MqttClient
from testbed.broker import AmqttBroker, MosquittoBroker
from tests.integration.test_mqtt import WAIT_S, broker, make_client  # noqa: F401

pytestmark = pytest.mark.integration


def test_suback_timeout_keeps_the_subscription_and_it_works_once_the_broker_is_back(
    broker: AmqttBroker | MosquittoBroker, make_client: Callable[..., MqttClient],  # noqa: F811
) -> None:
    sub, pub = make_client("sa-sub"), make_client("sa-pub")
    assert broker._proc is not None
    pid = broker._proc.pid
    os.kill(pid, signal.SIGSTOP)  # the broker hears nothing for a while
    try:
        with pytest.raises(TransportError, match="no SUBACK"):
            sub.subscribe("orchard/t/dev/1/task", qos=1, timeout_s=1.0)
        assert sub.is_subscribed("orchard/t/dev/1/task")
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:  # the subscription is in force (late SUBACK or re-sent)
        pub.publish("orchard/t/dev/1/task", b"task", qos=1, wait_s=WAIT_S)
        ev = sub.get(0.5)
        if ev is not None and getattr(ev, "topic", None) == "orchard/t/dev/1/task":
            break
    else:
        pytest.fail("the subscription never took effect")
