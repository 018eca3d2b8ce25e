"""MQTT client settings: the broker URL, the Last Will and `MqttConfig`, each checked when made.

Split from runtime/mqtt.py (the paho wrapper), which re-exports every name here. Board code:
standard library and runtime.errors only, Python 3.8 compatible.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import unquote, urlsplit

from runtime.errors import ConfigError
from runtime.record import field, record

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@record
class BrokerUrl:
    """A parsed `mqtt://[user[:password]@]host[:port]` or `mqtts://...` URL."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    # Kept out of repr so that logs and error messages never show it.
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerUrl:
    """Parse a broker URL; raise `ConfigError` naming the URL and what is wrong with it."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"broker URL is empty: {url!r}")
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ConfigError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://, not {parts.scheme!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker URL {url!r}: a path, query or fragment is not allowed")
    try:
        port = parts.port
    except ValueError as exc:  # non-numeric or out of range
        raise ConfigError(f"broker URL {url!r}: bad port ({exc})") from None
    host = parts.hostname
    if not host:
        raise ConfigError(f"broker URL {url!r}: no host")
    return BrokerUrl(
        scheme=scheme,
        host=host,
        port=DEFAULT_PORTS[scheme] if port is None else port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=scheme == "mqtts",
    )


@record
class Will:
    """Last Will: what the broker publishes when the client vanishes without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@record
class MqttConfig:
    client_id: str
    # The broker drops a silent client after 1.5 x keepalive and fires its will. Keep it above
    # twice the longest single-packet transfer on the slowest link (platform.md 4.3).
    keepalive_s: int = 30
    # TCP (+TLS) connect plus the wait for CONNACK.
    connect_timeout_s: float = 10.0
    # paho's exponential backoff: min, doubled per failed attempt, capped at max; whole
    # seconds because that is what paho's reconnect_delay_set takes.
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30
    will: Will | None = None
    # CA bundle for mqtts://; None means the system trust store. The server's certificate is
    # always verified (hostname included): paho's tls_set defaults to CERT_REQUIRED.
    ca_file: str | None = None
    # Optional client certificate and key for brokers that require one (mqtts:// only).
    cert_file: str | None = None
    key_file: str | None = None
    # Broker credentials. They come from a credentials file (never a command line); a password
    # in the URL is refused when these are set, so there is one source of truth.
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    clean_session: bool = True
    # Unacknowledged QoS>0 messages in flight at once (paho default 20).
    max_inflight: int = 20
    # QoS>0 messages paho holds (in flight + waiting for a connection); 0 = unbounded. Each one
    # keeps its whole payload in RAM until acked, which matters on a 512 MB board.
    max_queued: int = 0

    def __post_init__(self) -> None:
        if not self.client_id or len(self.client_id.encode()) > 65535:
            raise ConfigError(f"MQTT client id must be 1..65535 bytes, got {self.client_id!r}")
        who = f"MQTT client {self.client_id!r}"
        if not 0 <= self.keepalive_s <= 65535:
            raise ConfigError(f"{who}: keepalive_s must be 0..65535, got {self.keepalive_s}")
        if not 1 <= self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError(
                f"{who}: need 1 <= reconnect_min_s <= reconnect_max_s, "
                f"got {self.reconnect_min_s} and {self.reconnect_max_s}"
            )
        if self.connect_timeout_s <= 0:
            raise ConfigError(f"{who}: connect_timeout_s must be > 0")
        if self.protocol not in ("3.1.1", "5"):
            raise ConfigError(f"{who}: protocol must be '3.1.1' or '5', got {self.protocol!r}")
        if self.will is not None and self.will.qos not in (0, 1, 2):
            raise ConfigError(f"{who}: will qos must be 0, 1 or 2")
