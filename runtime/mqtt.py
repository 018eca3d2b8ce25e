"""MQTT transport: the one paho-mqtt 2.x wrapper, used by the device agent and the server.

Threading model. paho runs its network loop on its own thread (`loop_start`). Our callbacks
there only put an event on a thread-safe queue (`Connected`, `Disconnected`, `Message`) or
resolve an ack a caller waits for; the caller drains events with `get()` / `drain()`. Anything
slow on the paho thread (decoding a 10 MB frame) would stall PINGREQs and PUBACKs, and
`wait_for_publish` there deadlocks outright.

The single exception is re-subscription: on every CONNACK the `on_connect` callback re-issues
one SUBSCRIBE for every topic the caller subscribed to. `subscribe()` in paho only queues a
packet (it never blocks), and doing it there is the only place that guarantees the
subscriptions are back before the caller sees `Connected` and before paho re-sends queued
publishes. With `clean_session` (the default) and a broker that lost its state (restart, no
persistence), waiting for the caller to drain events would leave a window with no
subscriptions at all.

Publish semantics while the broker is unreachable (tested in tests/integration/test_mqtt.py):
  * QoS 0: `publish` raises `TransportError` at once; the message is dropped.
  * QoS 1/2: the message is queued in paho and sent after the automatic reconnect, with the
    same packet id (at-least-once; receivers dedupe, see DESIGN "Wire protocol"). The returned
    `PublishTicket.wait(timeout_s)` raises `TransportError` if no PUBACK arrives in time, and
    the message stays queued. `MqttConfig.max_queued` bounds that queue (a full queue raises).

Only MQTT features that both 3.1.1 and 5 have are used; 3.1.1 is the default because the
embedded test broker (amqtt) speaks nothing else. `protocol="5"` is tested against mosquitto.

This module goes onto boards: it imports only the standard library, paho-mqtt and
`runtime.errors`.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Union

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from runtime.errors import ConfigError, TransportError
from runtime.mqtt_config import DEFAULT_PORTS, BrokerUrl, MqttConfig, Will, parse_broker_url
from runtime.record import record

__all__ = ["DEFAULT_PORTS", "BrokerUrl", "Connected", "Disconnected", "Event", "Message", "MqttClient", "MqttConfig",
           "PublishTicket", "Will", "parse_broker_url"]


@record
class Connected:
    session_present: bool
    reconnect: bool  # False for the first CONNACK of this client, True after an outage


@record
class Disconnected:
    reason: str
    code: int


@record
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int


Event = Union[Connected, Disconnected, Message]


class _Ack:
    """One PUBACK/SUBACK (or QoS 0 socket write) someone may wait for."""

    __slots__ = ("done", "failure")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.failure: str | None = None

    def resolve(self, failure: str | None) -> None:
        self.failure = failure
        self.done.set()


class PublishTicket:
    """Returned by `publish`; `wait` blocks the caller (never the paho thread) until acked."""

    def __init__(self, owner: MqttClient, mid: int, topic: str, qos: int, ack: _Ack) -> None:
        self._owner = owner
        self.mid = mid
        self.topic = topic
        self.qos = qos
        self._ack = ack

    @property
    def acked(self) -> bool:
        return self._ack.done.is_set()

    def wait(self, timeout_s: float) -> None:
        if not self._ack.done.wait(timeout_s):
            raise self._owner._error(
                f"publish to {self.topic!r} (mid {self.mid}, QoS {self.qos}) not acknowledged within "
                f"{timeout_s:g} s; it stays queued and is re-sent after reconnect",
                "timeout",
            )
        if self._ack.failure is not None:
            raise self._owner._error(f"publish to {self.topic!r} refused", self._ack.failure)


class MqttClient:
    """A paho client with queued events, acks you can wait for, and automatic reconnect.

    Usage: `c = MqttClient(url, MqttConfig("dev07", will=Will(...))); c.connect();
    c.subscribe(...); c.publish(...); ev = c.get(1.0); ...; c.close()` (or use `with`).
    """

    # Early acks (a PUBACK that beats the registration of its mid) are consumed right after;
    # this cap only guards against leaks from acks nobody registers.
    _MAX_EARLY_ACKS = 1024

    def __init__(self, url: str | BrokerUrl, config: MqttConfig) -> None:
        self.url = url if isinstance(url, BrokerUrl) else parse_broker_url(url)
        self.config = config
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._subs: dict[str, int] = {}
        self._subs_lock = threading.Lock()
        self._ack_lock = threading.Lock()  # never held while calling into paho (paho holds its
        self._pending: dict[int, _Ack] = {}  # own locks while calling on_publish)
        self._early: dict[int, str | None] = {}
        self._connack = threading.Event()
        self._connack_failure: str | None = None
        self._ever_connected = False
        self._started = False
        self._closed = False
        self._client = self._make_paho_client()

    # ----- setup ---------------------------------------------------------------------------
    def _make_paho_client(self) -> mqtt.Client:
        cfg = self.config
        who = f"MQTT client {cfg.client_id!r}"
        v5 = cfg.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # v5 takes clean_start in connect() instead, and refuses clean_session here.
            clean_session=None if v5 else cfg.clean_session,
        )
        client.connect_timeout = cfg.connect_timeout_s
        client.reconnect_delay_set(min_delay=cfg.reconnect_min_s, max_delay=cfg.reconnect_max_s)
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(cfg.max_queued)
        if cfg.username is not None:
            if self.url.username is not None:
                raise ConfigError(f"{who}: credentials come from both the URL and a credentials file; use the file")
            client.username_pw_set(cfg.username, cfg.password)
        elif self.url.username is not None:
            client.username_pw_set(self.url.username, self.url.password)
        if (cfg.cert_file is None) != (cfg.key_file is None):
            raise ConfigError(f"{who}: a client certificate needs both cert_file and key_file")
        if self.url.tls:
            try:
                client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{who}: cannot load TLS files (CA {cfg.ca_file!r}, certificate "
                                  f"{cfg.cert_file!r}): {exc}") from exc
        elif cfg.ca_file is not None or cfg.cert_file is not None:
            raise ConfigError(f"{who}: ca_file or cert_file is set but {self.url} is not mqtts://")
        if cfg.will is not None:
            w = cfg.will
            try:
                client.will_set(w.topic, w.payload, qos=w.qos, retain=w.retain)
            except ValueError as exc:
                raise ConfigError(f"{who}: bad Last Will: {exc}") from exc
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    def _error(self, what: str, code: object) -> TransportError:
        return TransportError(f"MQTT client {self.config.client_id!r} at {self.url}: {what} (code: {code})")

    # ----- paho callbacks: run on the paho thread; enqueue and return -----------------------
    def _on_connect(
        self, client: mqtt.Client, _u: Any, flags: mqtt.ConnectFlags, rc: ReasonCode, _p: Properties | None
    ) -> None:
        if rc.is_failure:
            self._connack_failure = f"{rc} ({rc.value})"
            self._connack.set()
            return
        with self._subs_lock:
            subs = list(self._subs.items())
        if subs:  # re-subscribe: see the module docstring for why this runs here
            result, mid = client.subscribe(subs)
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._register(mid)
        self._events.put(Connected(bool(flags.session_present), reconnect=self._ever_connected))
        self._ever_connected = True
        self._connack.set()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: mqtt.DisconnectFlags, rc: ReasonCode, _p: Properties | None
    ) -> None:
        self._events.put(Disconnected(reason=str(rc), code=int(rc.value)))

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._events.put(Message(msg.topic, bytes(msg.payload), retain=bool(msg.retain), qos=msg.qos))

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Properties | None) -> None:
        self._resolve(mid, str(rc) if rc.is_failure else None)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, rcs: list[ReasonCode], _p: Properties | None) -> None:
        failed = [str(rc) for rc in rcs if rc.is_failure]
        self._resolve(mid, ", ".join(failed) if failed else None)

    # ----- ack bookkeeping ---------------------------------------------------------------------
    def _register(self, mid: int) -> _Ack:
        ack = _Ack()
        with self._ack_lock:
            if mid in self._early:
                ack.resolve(self._early.pop(mid))
            else:
                self._pending[mid] = ack
        return ack

    def _resolve(self, mid: int, failure: str | None) -> None:
        with self._ack_lock:
            ack = self._pending.pop(mid, None)
            if ack is None:
                if len(self._early) >= self._MAX_EARLY_ACKS:
                    self._early.clear()
                self._early[mid] = failure
                return
        ack.resolve(failure)

    # ----- public API --------------------------------------------------------------------------
    @property
    def client_id(self) -> str:
        return self.config.client_id

    @property
    def is_connected(self) -> bool:
        return self._started and not self._closed and self._client.is_connected()

    def connect(self) -> None:
        """Connect, start the network thread, and wait for a successful CONNACK.

        Raises `TransportError` if the broker is unreachable or refuses us. After this returns,
        outages are handled in the background: reconnect with backoff, re-subscribe, and a
        `Disconnected` / `Connected(reconnect=True)` pair on the event queue.
        """
        if self._closed:
            raise self._error("connect() after close()", "closed")
        if self._started:
            return
        # clean_start is v5 only; paho refuses any non-default value under 3.1.1.
        v5 = self.config.protocol == "5"
        clean_start = self.config.clean_session if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY
        try:
            self._client.connect(self.url.host, self.url.port, self.config.keepalive_s, clean_start=clean_start)
        except (OSError, ValueError) as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            code = getattr(exc, "errno", None) or type(exc).__name__
            raise self._error(f"cannot connect: {exc}", code) from exc
        self._started = True
        self._client.loop_start()
        if not self._connack.wait(self.config.connect_timeout_s):
            self.close()
            raise self._error(f"no CONNACK within {self.config.connect_timeout_s:g} s", "timeout")
        if self._connack_failure is not None:
            failure = self._connack_failure
            self.close()
            raise self._error("broker refused the connection", failure)

    def publish(
        self,
        topic: str,
        payload: bytes | bytearray | str,
        qos: int = 1,
        retain: bool = False,
        wait_s: float | None = None,
    ) -> PublishTicket:
        """Send one message. With `wait_s`, also wait that long for the PUBACK (see module doc)."""
        if not self._started or self._closed:
            raise self._error(f"publish to {topic!r} before connect() or after close()", "not connected")
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except (ValueError, TypeError) as exc:  # bad topic, bad QoS, payload over 256 MB
            raise self._error(f"publish to {topic!r} rejected: {exc}", "invalid") from exc
        rc = info.rc
        if rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise self._error(f"publish to {topic!r}: max_queued={self.config.max_queued} reached", rc.name)
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            raise self._error(f"publish to {topic!r}: not connected, QoS 0 message dropped", rc.name)
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise self._error(f"publish to {topic!r} failed: {mqtt.error_string(rc)}", rc)
        ticket = PublishTicket(self, info.mid, topic, qos, self._register(info.mid))
        if wait_s is not None:
            ticket.wait(wait_s)
        return ticket

    def subscribe(self, topic: str, qos: int = 1, timeout_s: float = 10.0) -> None:
        """Subscribe now and on every reconnect. Waits for the SUBACK when connected; when not
        connected, returns at once and the SUBSCRIBE goes out with the next CONNACK."""
        if self._closed:
            raise self._error(f"subscribe to {topic!r} after close()", "closed")
        if qos not in (0, 1, 2):
            raise self._error(f"subscribe to {topic!r}: QoS must be 0, 1 or 2, got {qos}", "invalid")
        with self._subs_lock:
            self._subs[topic] = qos
        if not self.is_connected:
            return
        try:
            result, mid = self._client.subscribe(topic, qos)
        except ValueError as exc:
            with self._subs_lock:
                self._subs.pop(topic, None)
            raise self._error(f"subscribe to {topic!r} rejected: {exc}", "invalid") from exc
        if result == MQTTErrorCode.MQTT_ERR_NO_CONN or mid is None:
            return  # lost the connection meanwhile; on_connect re-subscribes
        ack = self._register(mid)
        if not ack.done.wait(timeout_s):
            raise self._error(f"no SUBACK for {topic!r} within {timeout_s:g} s", "timeout")
        if ack.failure is not None:
            with self._subs_lock:
                self._subs.pop(topic, None)
            raise self._error(f"broker refused the subscription to {topic!r}", ack.failure)

    def is_subscribed(self, topic: str) -> bool:
        """Whether `topic` is among the subscriptions sent again on every reconnect."""
        with self._subs_lock:
            return topic in self._subs

    def unsubscribe(self, topic: str) -> None:
        with self._subs_lock:
            self._subs.pop(topic, None)
        if self.is_connected:
            self._client.unsubscribe(topic)

    def get(self, timeout_s: float | None = None) -> Event | None:
        """Next event, waiting up to `timeout_s` (None = forever, 0 = don't wait); None if none."""
        try:
            if timeout_s is not None and timeout_s <= 0:
                return self._events.get_nowait()
            return self._events.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def drain(self) -> list[Event]:
        """Every event queued right now, without waiting."""
        out: list[Event] = []
        while (ev := self.get(0)) is not None:
            out.append(ev)
        return out

    def close(self) -> None:
        """Send DISCONNECT (so the broker does NOT fire the will: publish your own "offline"
        first if you want one) and stop the network thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()

    def __enter__(self) -> MqttClient:
        self.connect()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
