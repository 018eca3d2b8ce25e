"""Campaign files: the fleet, the model and data, the method and the round policy, in one TOML.

    [campaign]  name, seed, description, offline = "unreachable" | "powered-off" (what an offline
                spell means for energy: idle power charged, or nothing), min_devices (no task goes out
                before this many devices said hello; default: those online at the start)
    [stop]      rounds (aggregations), duration_board_s, target_accuracy        (whichever comes first)
    [model]     name, dataset, data_root, partition, eval_fraction, samples, input_shape (synthetic)
    [method]    name (fedavg | heterofl | classes | fjord), and the method's keys (its spec in
                runtime/methods/<name>.py checks them); without it each profile goes to the first
                method that accepts it, as before methods existed
    [strategy]  name, and any strategy parameter (k_fraction, deadline_s, max_staleness, ...);
                keys the method sets by default (e.g. merge = "per-element") may be overridden
    [train]     local_steps, local_epochs, lr, batch_size, upload, encoding
    [broker]    kind = embedded | mosquitto | url, url, keepalive_s (devices; the broker declares a
                silent device offline after 1.5 x this, so it bounds how fast an outage is seen),
                client_certs (mosquitto: every client also shows a certificate the lab's CA signed)
    [throttle]  backend = auto | cgroup2 | cgroup1 | none, require, dilation = "auto" | <number> | "off",
                host_speed (pin the host's speed factor), reserve_cores (kept for broker, server, harness)
    [[fleet]]   name, board, count, profile | profiles, availability = {...}, cpu = {...},
                mem_limit_mb (override the board's cap), link = {...} (bandwidth caps, testbed.links:
                kind = wifi | ethernet (the board's figures) | custom, up_mbit, down_mbit, delay_ms,
                loss_pct, trace = {a cpu-kind trace scaling both caps})
    [cluster]   engine = "ray", address = "auto" | "ray://HOST:PORT": the fleet runs on the nodes of a
                Ray cluster (testbed.cluster); without it nothing imports Ray

Every table rejects unknown keys and every value is checked, so errors name the file, the
table and the field. Traces are validated here too (by building them), so a bad trace fails
before any process starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.partition import parse_partition
from models.structure import MODELS
from runtime.board import load_board
from runtime.errors import ConfigError
from runtime.methods import spec
from runtime.telemetry import OFFLINE_MODES
from runtime.tomlconf import TomlTable, check_tables, load_toml
from server.config import canonical_profile, method_table
from server.strategies import STRATEGY_NAMES, get_strategy, strategy_defaults
from testbed.cgroups import MIN_MEM_LIMIT_MB
from testbed.dilation import DEFAULT_RESERVE_CORES, parse_setting
from testbed.links import LinkSpec, link_trace, parse_link

BROKER_KINDS = ("embedded", "mosquitto", "url")
THROTTLE_BACKENDS = ("auto", "cgroup2", "cgroup1", "none")
_TABLES = ("campaign", "stop", "model", "method", "strategy", "train", "broker", "throttle", "fleet", "cluster")
_KEYS = {
    "campaign": frozenset({"name", "seed", "description", "offline", "min_devices"}),
    "stop": frozenset({"rounds", "duration_board_s", "target_accuracy"}),
    "model": frozenset({"name", "dataset", "data_root", "partition", "eval_fraction", "samples", "input_shape"}),
    "train": frozenset({"local_steps", "local_epochs", "lr", "batch_size", "upload", "encoding"}),
    "broker": frozenset({"kind", "url", "keepalive_s", "client_certs"}),
    "throttle": frozenset({"backend", "require", "dilation", "host_speed", "reserve_cores"}),
    "fleet": frozenset({"name", "board", "count", "profile", "profiles", "availability", "cpu", "mem_limit_mb",
                        "link"}),
    "cluster": frozenset({"engine", "address"}),
}
# Keys renamed since a campaign file could hold them: one line naming the new key, not "unknown key".
_RENAMED = {"stop": {"wall_s": "duration_board_s"}}
CLUSTER_ENGINES = ("ray",)


@dataclass(frozen=True)
class Group:
    name: str
    board: str
    count: int
    profiles: tuple[str, ...]  # the first is what the server assigns; the rest are fallbacks it may use
    availability: Mapping[str, Any] = field(default_factory=lambda: {"kind": "always"})
    cpu: Mapping[str, Any] = field(default_factory=lambda: {"kind": "constant", "value": 1.0})
    mem_limit_mb: int | None = None
    link: LinkSpec | None = None  # None: unshaped, in the host's network namespace


@dataclass(frozen=True)
class ClusterSpec:
    engine: str  # CLUSTER_ENGINES
    address: str  # "auto" (RAY_ADDRESS, else the cluster this host belongs to) or "ray://HOST:PORT"


@dataclass(frozen=True)
class Campaign:
    name: str
    seed: int
    description: str
    rounds: int | None
    duration_board_s: float
    target_accuracy: float | None
    model: str
    dataset: str
    data_root: str | None
    partition: str
    eval_fraction: float
    samples: int | None
    input_shape: tuple[int, ...] | None
    strategy: str
    strategy_params: Mapping[str, Any]  # the method's defaults for this strategy, then [strategy]'s
    method: str | None  # None: inferred per profile
    method_params: Mapping[str, Any]
    local_steps: int
    local_epochs: int
    lr: float
    batch_size: int
    upload: str
    encoding: str
    broker: str  # embedded | mosquitto | an mqtt:// URL
    keepalive_s: int
    throttle_backend: str
    throttle_require: bool
    dilation: str | float  # "auto" | "off" | a factor >= 1 (testbed.dilation)
    host_speed: float | None  # pins the host's speed factor; None: ORCHARD_HOST_SPEED or calibration
    reserve_cores: float
    fleet: tuple[Group, ...]
    source: Path | None = None
    offline: str = "unreachable"  # runtime.telemetry.OFFLINE_MODES
    min_devices: int | None = None  # None: the devices online at the start
    client_certs: bool = False  # mosquitto only: TLS client certificates on top of the passwords
    cluster: ClusterSpec | None = None  # None: every device on this host (testbed.runner)

    @property
    def n_devices(self) -> int:
        return sum(g.count for g in self.fleet)

    def devices(self) -> list[tuple[str, Group]]:
        """(device id, group) for every device, ids `<group>-<i>`."""
        return [(f"{g.name}-{i}", g) for g in self.fleet for i in range(g.count)]


def load_campaign(path: str | Path, data: Mapping[str, Any] | None = None) -> Campaign:
    """Read and check a campaign file; `data` (a sweep variant's tables) stands in for its content."""
    p = Path(path)
    file = str(p)
    data = load_toml(p) if data is None else dict(data)
    check_tables(file, data, _TABLES)

    def table(name: str) -> TomlTable:
        section = data.get(name, {})
        for key, renamed in _RENAMED.get(name, {}).items():
            if isinstance(section, Mapping) and key in section:
                raise ConfigError(f"{file}: [{name}] {key} is now {renamed} (the same board seconds); rename it")
        return TomlTable(file, name, section, _KEYS[name])

    camp, stop, model, train = table("campaign"), table("stop"), table("model"), table("train")
    broker, throttle = table("broker"), table("throttle")

    method, method_params = method_table(file, data.get("method"))
    strat_data = dict(data.get("strategy", {}))
    strategy = strat_data.pop("name", "semi-async")
    if strategy not in STRATEGY_NAMES:
        raise ConfigError(f"{file}: [strategy] name must be one of {', '.join(STRATEGY_NAMES)}; got {strategy!r}")
    if method is not None:
        takes = strategy_defaults(strategy)
        strat_data = {**{k: v for k, v in spec(method).strategy_defaults.items() if k in takes}, **strat_data}
    try:
        get_strategy(strategy, **strat_data)
    except ConfigError as exc:
        raise ConfigError(f"{file}: [strategy] {exc}") from None

    partition = model.string("partition", default="iid")
    try:
        parse_partition(partition)
    except ConfigError as exc:
        raise ConfigError(f"{file}: [model] partition: {exc}") from None

    kind = broker.string("kind", BROKER_KINDS, default="embedded")
    url = broker.optional_string("url")
    if kind == "url" and not url:
        raise ConfigError(f"{file}: [broker] kind = \"url\" needs url = \"mqtt://host:port\"")

    groups = data.get("fleet", [])
    if not isinstance(groups, list) or not groups:
        raise ConfigError(f"{file}: needs at least one [[fleet]] group")
    canonical = canonical_profile(file, method, method_params)
    fleet = tuple(_group(file, i, g, canonical) for i, g in enumerate(groups))
    names = [g.name for g in fleet]
    if len(set(names)) != len(names):
        raise ConfigError(f"{file}: [[fleet]] group names must be unique, got {names}")

    rounds = stop.integer("rounds", 1, 10**6) if "rounds" in stop.data else None
    target = stop.optional_number("target_accuracy", 0.0, 1.0, lo_open=True)
    local_steps = train.integer("local_steps", 0, 10**6, default=20)
    local_epochs = train.integer("local_epochs", 0, 10**4, default=0)
    if local_steps == 0 and local_epochs == 0:
        raise ConfigError(f"{file}: [train] needs local_steps > 0 or local_epochs > 0")
    return Campaign(
        name=camp.string("name", default=p.stem),
        seed=camp.integer("seed", 0, 2**31, default=0),
        description=str(camp.data.get("description", "")),
        rounds=rounds,
        duration_board_s=stop.number("duration_board_s", 1.0, 7 * 24 * 3600.0, default=600.0),
        target_accuracy=target,
        model=model.string("name", MODELS, default="lenet"),
        dataset=model.string("dataset", default="digits"),
        data_root=model.optional_string("data_root"),
        partition=partition,
        eval_fraction=model.number("eval_fraction", 0.0, 0.9, default=0.2, lo_open=True),
        samples=model.integer("samples", 10, 10**8) if "samples" in model.data else None,
        input_shape=_shape(file, model.data.get("input_shape")),
        strategy=strategy,
        strategy_params=strat_data,
        method=method,
        method_params=method_params,
        local_steps=local_steps,
        local_epochs=local_epochs,
        lr=train.number("lr", 0.0, 100.0, default=0.1, lo_open=True),
        batch_size=train.integer("batch_size", 1, 1 << 16, default=32),
        upload=train.string("upload", ("weights", "delta"), default="weights"),
        encoding=train.string("encoding", ("dense", "fp16"), default="dense"),
        broker=url if kind == "url" and url else ("amqtt" if kind == "embedded" else kind),
        keepalive_s=broker.integer("keepalive_s", 2, 3600, default=5),
        throttle_backend=throttle.string("backend", THROTTLE_BACKENDS, default="auto"),
        throttle_require=throttle.boolean("require", default=False),
        dilation=parse_setting(file, throttle.data.get("dilation", "auto")),
        host_speed=throttle.optional_number("host_speed", 0.0, 1000.0, lo_open=True),
        reserve_cores=throttle.number("reserve_cores", 0.0, 1024.0, default=DEFAULT_RESERVE_CORES),
        fleet=fleet,
        source=p,
        offline=camp.string("offline", OFFLINE_MODES, default="unreachable"),
        min_devices=_min_devices(file, camp, sum(g.count for g in fleet)),
        client_certs=_client_certs(file, broker, kind),
        cluster=_cluster(file, data.get("cluster"), fleet),
    )


def _client_certs(file: str, broker: TomlTable, kind: str) -> bool:
    wanted = broker.boolean("client_certs", default=False)
    if wanted and kind != "mosquitto":
        raise ConfigError(f"{file}: [broker] client_certs = true needs kind = \"mosquitto\" (the TLS broker)")
    return wanted


def _cluster(file: str, raw: Any, fleet: tuple[Group, ...]) -> ClusterSpec | None:
    if raw is None:
        return None
    t = TomlTable(file, "cluster", raw, _KEYS["cluster"])
    engine = t.string("engine", CLUSTER_ENGINES, default="ray")
    address = t.string("address", default="auto")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address != "auto" and not (address.startswith("ray://") and host and port.isdigit()):
        raise ConfigError(f"{file}: [cluster] address must be \"auto\" or \"ray://HOST:PORT\", got {address!r}")
    for g in fleet:
        if g.link is not None:  # netns shaping needs the broker's bridge on the device's own host
            raise ConfigError(f"{file}: [[fleet]] {g.name!r}: link shaping is not supported with [cluster] yet; "
                              "remove link or [cluster]")
    return ClusterSpec(engine, address)


def _min_devices(file: str, camp: TomlTable, n_devices: int) -> int | None:
    if "min_devices" not in camp.data:
        return None
    value = camp.integer("min_devices", 1, 10**6)
    if value > n_devices:
        raise ConfigError(f"{file}: [campaign] min_devices = {value} is more than the fleet's {n_devices} devices")
    return value


def _shape(file: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in value)):
        raise ConfigError(f"{file}: [model] input_shape must be [channels, height, width], got {value!r}")
    return tuple(value)


def _group(file: str, index: int, raw: Any, canonical: Callable[[str], str]) -> Group:
    t = TomlTable(file, f"fleet.{index}", raw, _KEYS["fleet"])
    name = t.string("name")
    where = f"[[fleet]] {name!r}"
    if not all(c.isalnum() or c in "_" for c in name):
        raise ConfigError(f"{file}: {where}: name may use letters, digits and _ only (it becomes device ids)")
    board = t.string("board")
    try:
        board_config = load_board(board)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {where} board: {exc}") from None
    if "profile" in t.data and "profiles" in t.data:
        raise ConfigError(f"{file}: {where}: give profile or profiles, not both")
    texts = t.strings("profiles") if "profiles" in t.data else (t.string("profile", default="dense"),)
    try:
        profiles = tuple(canonical(x) for x in texts)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for key in ("availability", "cpu"):
        if key in t.data and not isinstance(t.data[key], dict):
            raise ConfigError(f"{file}: {where}: {key} must be an inline table like {{ kind = \"always\" }}")
    group = Group(
        name=name, board=board, count=t.integer("count", 1, 10_000, default=1), profiles=profiles,
        availability=dict(t.data.get("availability", {"kind": "always"})),
        cpu=dict(t.data.get("cpu", {"kind": "constant", "value": 1.0})),
        mem_limit_mb=t.integer("mem_limit_mb", MIN_MEM_LIMIT_MB, 1 << 20) if "mem_limit_mb" in t.data else None,
        link=parse_link(f"{file}: {where}", t.data["link"], board_config) if "link" in t.data else None,
    )
    _check_traces(file, where, group)
    return group


def _check_traces(file: str, where: str, group: Group) -> None:
    from testbed.traces import make_availability, make_cpu_trace

    base = Path(file).parent
    try:
        make_availability(group.availability, seed=0, base_dir=base, device=f"{group.name}-0", index=0)
        make_cpu_trace(group.cpu, seed=0, base_dir=base, device=f"{group.name}-0", index=0)
        if group.link is not None:
            link_trace(group.link, seed=0, base_dir=base, device=f"{group.name}-0", index=0)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {where}: {exc}") from None
