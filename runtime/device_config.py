"""What one device is told at start: its id, board, data shard, artifact cache and broker.

    [device]
    id = "dev0"
    board = "rpi4b-4gb"              # a name in firmware_configs/ or a path to a board TOML
    shard = "shards/dev0.npz"        # x: float32 (N, C, H, W), y: int64 (N,)
    artifact_cache = "artifacts"     # artifact directories by key; pushed ones are stored here
    profiles = ["dense", "width=0.5"]
    threads = 0                      # ORT threads; 0 = from the cgroup CPU quota or the board
    telemetry_hz = 1.0
    poll_s = 0.05                    # longest idle wait of the main loop (wall s): how soon a finished
                                     # job is seen; the testbed scales it with time dilation
    trainer_start_timeout_s = 60     # wall s the trainer child may take to come up (the testbed
                                     # scales it with time dilation, as poll_s)
    sysfs_root = "/"                 # where power sensors are looked up (tests use a fake tree)
    offline = "unreachable"          # energy while stopped (a frozen emulated board): "unreachable"
                                     # charges idle power, "powered-off" charges nothing

    [broker]
    url = "mqtt://127.0.0.1:1883"    # mqtt:// or mqtts://, optional user:password@
    root = "orchard/default"         # topic root of the campaign
    keepalive_s = 10
    ca_file = "ca.crt"               # optional, for mqtts://: the lab's CA, the broker is verified with it
    cert_file = "dev0.crt"           # optional client certificate (with key_file), for brokers that want one
    key_file = "dev0.key"
    credentials = "dev0.secret.toml" # broker login + this device's HMAC key (mode 0600; runtime/credentials.py)
    run_id = "4f1c0a9e2b7d3c55"      # the campaign run this device serves; messages of other runs are refused
"""

from __future__ import annotations

from pathlib import Path

from runtime.errors import ConfigError
from runtime.methods import device_profile
from runtime.protocol import ID_PATTERN, check_topic_root
from runtime.record import record
from runtime.tiering import TIER_MODES
from runtime.tomlconf import TomlTable, check_tables, load_toml

_DEVICE_KEYS = frozenset({"id", "board", "shard", "artifact_cache", "profiles", "threads", "telemetry_hz",
                          "poll_s", "trainer_start_timeout_s", "sysfs_root", "offline", "tier"})
# The agent's loop wakes at least this often (wall s) to poll its trainer. Each wake costs the
# agent ~70 us of CPU inside the board's quota: nothing on a real board (20 Hz = 0.15 % of a
# core), but under time dilation delta the quota shrinks by delta while the wakes stay, so the
# testbed passes DEFAULT_POLL_S x delta (the same 50 ms of board time).
DEFAULT_POLL_S = 0.05
# What an offline spell means for energy (runtime.telemetry.Sampler applies it). In the testbed a
# device goes offline by having its cgroup frozen; on a board it is either still powered but
# unreachable (network gone: the board idles, idle power is charged) or powered off (nothing is
# charged). The same rule holds over the whole trace: at the start, in the middle and at the end.
# Defined here, not in runtime.telemetry, so reading a config imports no psutil before the hello.
OFFLINE_MODES = ("unreachable", "powered-off")
# A trainer child imports ONNX Runtime and opens its sessions (~0.5-1 CPU s); under time dilation
# its quota shrinks by delta, so the testbed passes this x delta (the same board seconds).
DEFAULT_TRAINER_START_TIMEOUT_S = 60.0
UNPROVISIONED = "unprovisioned"  # what a bundle built without a lab says, until someone provisions it
_BROKER_KEYS = frozenset({"url", "root", "keepalive_s", "ca_file", "cert_file", "key_file", "credentials",
                          "run_id"})


@record
class DeviceConfig:
    device_id: str
    board: str
    shard: Path
    artifact_cache: Path
    profiles: tuple[str, ...]
    broker_url: str
    root: str
    credentials: Path
    run_id: str
    threads: int = 0
    telemetry_hz: float = 1.0
    poll_s: float = DEFAULT_POLL_S
    trainer_start_timeout_s: float = DEFAULT_TRAINER_START_TIMEOUT_S
    keepalive_s: int = 10
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    sysfs_root: str = "/"
    offline: str = "unreachable"  # one of OFFLINE_MODES
    # fixed: the server assigns among `profiles`; by-resources: the device picks the first of
    # `profiles` (largest first) that fits what it measured (runtime/tiering.py)
    tier: str = "fixed"

    def check_provisioned(self) -> None:
        """Before joining: a bundle built without a lab loads (install.sh checks it) but cannot log in."""
        if self.run_id == UNPROVISIONED:
            raise ConfigError(f"device {self.device_id}: [broker] run_id is {UNPROVISIONED!r}: set the campaign's "
                              "run id and put the device's credentials in place (orchard bundle --lab does both)")


def load_device_config(path: str | Path, broker_url: str | None = None) -> DeviceConfig:
    """Load a device TOML; relative paths are relative to the file. `broker_url` overrides [broker] url."""
    p = Path(path)
    data = load_toml(p)
    check_tables(str(p), data, ("device", "broker"))
    dev = TomlTable(str(p), "device", data.get("device", {}), _DEVICE_KEYS)
    brk = TomlTable(str(p), "broker", data.get("broker", {}), _BROKER_KEYS)
    base = p.parent

    def resolve(text: str) -> Path:
        q = Path(text)
        return q if q.is_absolute() else base / q

    profiles = dev.strings("profiles", default=("dense",))
    canonical = [_canonical(str(p), t) for t in profiles]  # ConfigError naming the bad profile
    run_id = brk.string("run_id")
    if not ID_PATTERN.fullmatch(run_id):
        raise ConfigError(f"{p}: [broker] run_id must match {ID_PATTERN.pattern}, got {run_id!r}")

    def optional_path(key: str) -> str | None:
        text = brk.optional_string(key)
        return None if text is None else str(resolve(text))
    return DeviceConfig(
        device_id=dev.string("id"),
        board=dev.string("board"),
        shard=resolve(dev.string("shard")),
        artifact_cache=resolve(dev.string("artifact_cache")),
        profiles=tuple(canonical),
        broker_url=broker_url or brk.string("url"),
        root=_topic_root(str(p), brk.string("root", default="orchard/default")),
        credentials=resolve(brk.string("credentials")),
        run_id=run_id,
        threads=dev.integer("threads", 0, 256, default=0),
        telemetry_hz=dev.number("telemetry_hz", 0.0, 50.0, default=1.0, lo_open=True),
        poll_s=dev.number("poll_s", 0.0, 60.0, default=DEFAULT_POLL_S, lo_open=True),
        trainer_start_timeout_s=dev.number("trainer_start_timeout_s", 0.0, 86400.0,
                                           default=DEFAULT_TRAINER_START_TIMEOUT_S, lo_open=True),
        keepalive_s=brk.integer("keepalive_s", 2, 3600, default=10),
        ca_file=optional_path("ca_file"),
        cert_file=optional_path("cert_file"),
        key_file=optional_path("key_file"),
        sysfs_root=dev.string("sysfs_root", default="/"),
        offline=dev.string("offline", OFFLINE_MODES, default="unreachable"),
        tier=dev.string("tier", TIER_MODES, default="fixed"),
    )


def _canonical(file: str, text: str) -> str:
    try:
        return device_profile(text)
    except ConfigError as exc:
        raise ConfigError(f"{file}: [device] profiles: {exc}") from None


def _topic_root(file: str, root: str) -> str:
    try:
        return check_topic_root(root)
    except ConfigError as exc:
        raise ConfigError(f"{file}: [broker] root: {exc}") from None
