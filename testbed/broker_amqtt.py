"""The embedded broker's child process: amqtt 0.12.1, patched, run by testbed.broker.AmqttBroker.

Its quirks, handled here (see `_patch_amqtt`):
  1. The broker never enforces keepalive: on a read timeout its handler does nothing
     (`BrokerProtocolHandler.handle_read_timeout` is `pass`), so a frozen client (SIGSTOP, a
     frozen cgroup: how the testbed takes a device offline) never loses its session and its
     Last Will never fires. We close the connection on timeout, which fires the will.
  2. Its timeout is keepalive + `timeout-disconnect-delay` seconds (not the 1.5 x keepalive of
     MQTT 3.1.1 section 3.1.2.10), and it races paho, which pings only once keepalive has
     elapsed. We set the delay to 0 and scale the session's keepalive by 1.5.
  3. No packet or message size limit exists (a 200 MB publish was relayed). We cap the packet
     size as mosquitto's `max_packet_size` does: a fixed header announcing more than
     `MAX_PACKET_BYTES` closes that client's connection before the body is read.
  4. The default config enables `$SYS` publishing and packet logging; we load only the
     auth plugins: with a lab, its FileAuthPlugin (Argon2 hashes) and TopicAccessControlListPlugin
     (`acl` for subscriptions, `publish_acl`; an empty `publish_acl` would allow every publish);
     without one, the anonymous plugin, which is why the listener is loopback-only. The
     documented hyphenated keys ("timeout-disconnect-delay") are rejected by 0.12's strict
     dict loader: use underscores.
  5. `Broker._run_broadcast` logs f"Processing broadcast message: {broadcast}" without checking
     the log level, so every forwarded message has its payload repr()'d on the event loop:
     ~165 ms per 10 MB, during which the broker answers nobody. We hand it a bytes subclass
     whose repr is short.
  6. On every CONNECT it replays retained messages for every filter in its *global*
     subscription table, not the session's own, so a client receives retained messages it
     never subscribed to (a device got other devices' statuses because the server holds
     `dev/+/+`). We let the replay through only for filters the session itself holds.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError
from testbed.broker import LOOPBACK, MAX_PACKET_BYTES, _require_loopback


class _QuietBytes(bytes):
    """A payload with a short repr (quirk 5 in the module doc)."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


def _patch_amqtt(max_packet_bytes: int = MAX_PACKET_BYTES) -> None:
    """Fix amqtt quirks 1, 2, 3, 5 and 6 (module doc) by wrapping five of its methods."""
    import asyncio
    import math

    from amqtt.broker import Broker as AmqttCore
    from amqtt.mqtt.packet import MQTTFixedHeader
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

    original_header = MQTTFixedHeader.from_stream.__func__

    async def fixed_header_from_stream(cls: Any, reader: Any) -> Any:
        header = await original_header(cls, reader)
        if header is not None and header.remaining_length > max_packet_bytes:
            # Not an MQTTError (which amqtt discards and reads on, mid-body): any other exception
            # ends the client's reader loop, so its connection closes, as mosquitto does.
            raise ConnectionAbortedError(f"packet of {header.remaining_length} bytes over the cap of "
                                         f"{max_packet_bytes}")
        return header

    MQTTFixedHeader.from_stream = classmethod(fixed_header_from_stream)

    def handle_read_timeout(self: BrokerProtocolHandler) -> None:
        # Treat silence past the keepalive as a dead client: the broker then fires the will.
        self._orchard_close = asyncio.ensure_future(self.handle_connection_closed())  # keep a ref

    original_init = AmqttCore._initialize_client_session

    async def initialize_client_session(self: AmqttCore, *args: Any, **kwargs: Any) -> Any:
        handler, session = await original_init(self, *args, **kwargs)
        if session.keep_alive > 0:
            session.keep_alive = math.ceil(session.keep_alive * 1.5)
        return handler, session

    original_broadcast = AmqttCore._broadcast_message

    async def broadcast_message(
        self: AmqttCore, session: Any, topic: str | None, data: bytes | bytearray | None, force_qos: int | None = None
    ) -> None:
        if data is not None and len(data) > 1024:
            data = _QuietBytes(data)  # one copy (~3 ms for 10 MB) instead of a ~165 ms repr
        await original_broadcast(self, session, topic, data, force_qos)

    original_retained = AmqttCore._publish_retained_messages_for_subscription

    async def publish_retained_for_subscription(self: AmqttCore, subscription: Any, session: Any) -> None:
        # Quirk 6: on every CONNECT, amqtt 0.12.1 replays retained messages for *every* filter in
        # its global subscription table, so a device received other devices' retained statuses
        # because the server subscribes to dev/+/+. Only the session's own filters may match.
        holders = self._subscriptions.get(subscription[0], [])
        if any(s.client_id == session.client_id for s, _ in holders):
            await original_retained(self, subscription, session)

    AmqttCore._publish_retained_messages_for_subscription = publish_retained_for_subscription
    BrokerProtocolHandler.handle_read_timeout = handle_read_timeout
    AmqttCore._broadcast_message = broadcast_message
    AmqttCore._initialize_client_session = initialize_client_session


def amqtt_config(host: str, port: int, auth: dict[str, Any] | None = None) -> dict[str, Any]:
    anonymous = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Underscore: 0.12 loads the dict strictly into a dataclass and rejects the documented
        # hyphenated key "timeout-disconnect-delay".
        "timeout_disconnect_delay": 0,
        "plugins": auth if auth is not None else anonymous,
    }


def serve_amqtt(host: str, port: int, max_packet_bytes: int = MAX_PACKET_BYTES,
                auth: dict[str, Any] | None = None) -> None:
    """Run an amqtt broker until SIGTERM/SIGINT (the body of `python -m testbed.broker_amqtt`)."""
    import asyncio
    import logging

    from amqtt.broker import Broker as AmqttCore

    _require_loopback(host)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s amqtt %(levelname)s %(name)s: %(message)s")
    # amqtt logs every dropped connection (our readiness probes included) at WARNING/ERROR.
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    _patch_amqtt(max_packet_bytes)

    async def main() -> None:
        broker = AmqttCore(amqtt_config(host, port, auth))
        await broker.start()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        await broker.shutdown()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.broker_amqtt", description="Run the embedded broker.")
    parser.add_argument("--host", default=LOOPBACK, help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--max-packet-bytes", type=int, default=MAX_PACKET_BYTES,
                        help="close a client that sends a bigger MQTT packet (default 64 MiB)")
    parser.add_argument("--auth", help="JSON file: amqtt auth and topic-check plugin sections (a lab's)")
    args = parser.parse_args(argv)
    try:
        auth = None
        if args.auth:
            try:
                auth = json.loads(Path(args.auth).read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--auth {args.auth}: {exc}") from None
        serve_amqtt(args.host, args.port, args.max_packet_bytes, auth)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
