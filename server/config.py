"""The aggregator's TOML config (`orchard server --config server.toml`).

    [server]
    id = "server"
    root = "orchard/demo"           # topic root of the campaign
    artifacts = "artifacts.json"    # the model: global init, layout and one artifact per profile
    eval_data = "eval.npz"          # held-out split the global model is scored on (x, y)
    broker = "mqtt://127.0.0.1:1883"
    seed = 0
    roster = ["dev0", "dev1"]       # optional: messages from any other id are refused
    credentials = "secrets/server.toml"  # broker login + every device's HMAC key (mode 0600)
    run_id = "4f1c0a9e2b7d3c55"     # this run: messages sealed for another run are refused
    ca_file = "secrets/ca.crt"      # optional, for mqtts://
    cert_file = "secrets/orchard-server.crt"  # optional client certificate (with key_file)
    key_file = "secrets/orchard-server.key"

    [rounds]
    strategy = "semi-async"         # fedavg | fedavg-deadline | semi-async | fedbuff | fedasync
    target_version = 10             # stop after this many aggregations
    target_accuracy = 0.93          # optional: stop once an evaluated version reaches this accuracy
    time_limit_s = 600
    min_devices = 3                 # no task goes out before this many devices said hello
    max_devices = 10000             # hellos from more ids than this are refused (bounded state)
    task_timeout_s = 120            # a task unanswered this long is abandoned (default 600: none
                                    # leaves a device, or a round, waiting forever)
    eval_every = 1

    [strategy]                      # parameters of the chosen strategy, e.g. k_fraction, deadline_s
    k_fraction = 0.5

    [method]                        # optional: the method and its keys (runtime/methods/<name>.py);
    name = "fjord"                  # without it each profile goes to the first method accepting it
    widths = [0.25, 0.5, 1.0]

    [train]                         # what each task asks of a device
    local_steps = 20
    local_epochs = 0
    lr = 0.1
    batch_size = 32
    upload = "weights"              # weights | delta
    encoding = "dense"              # dense | fp16

    [assign]                        # profile per device; default for the rest
    default = "dense"
    devices = { dev0 = "width=0.5" }
    shard_samples = { dev0 = 240 }  # optional: an update's n_samples is capped at its shard's size
    downgrade_on_oom = true         # a task killed by OOM moves its device to the next smaller
                                    # profile its hello lists (dense > width=0.75 > width=0.5)

    [clock]                         # written by the campaign runner; both optional
    start_unix = 1767225600.0       # campaign start (Unix s): every output time counts from it
    dilation = 2.6                  # wall seconds per board second: all times here are board time
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError
from runtime.methods import METHOD_NAMES, check_name, device_profile, spec
from runtime.protocol import ID_PATTERN, check_topic_root
from runtime.tomlconf import TomlTable, check_tables, load_toml
from server.policies import DEVICE_CHOICE
from server.records import EngineConfig
from server.strategies import DEFAULT_STRATEGY, STRATEGY_NAMES, get_strategy

_SERVER_KEYS = frozenset({"id", "root", "artifacts", "eval_data", "broker", "seed", "roster", "credentials", "run_id",
                          "ca_file", "cert_file", "key_file"})
DEFAULT_TASK_TIMEOUT_S = 600.0
_ROUND_KEYS = frozenset({"strategy", "target_version", "target_accuracy", "time_limit_s", "min_devices",
                         "task_timeout_s", "eval_every", "max_devices"})
_TRAIN_KEYS = frozenset({"local_steps", "local_epochs", "lr", "batch_size", "upload", "encoding"})
_ASSIGN_KEYS = frozenset({"default", "devices", "downgrade_on_oom", "shard_samples"})
_CLOCK_KEYS = frozenset({"start_unix", "dilation"})


@dataclass(frozen=True)
class TrainKnobs:
    local_steps: int = 20
    local_epochs: int = 0
    lr: float = 0.1
    batch_size: int = 32
    upload: str = "weights"
    encoding: str = "dense"


@dataclass(frozen=True)
class ServerConfig:
    server_id: str
    root: str
    artifacts: Path
    eval_data: Path
    broker: str
    credentials: Path
    run_id: str
    strategy: str
    strategy_params: Mapping[str, Any]
    engine: EngineConfig
    train: TrainKnobs
    default_profile: str = "dense"
    device_profiles: Mapping[str, str] = field(default_factory=dict)
    seed: int = 0
    downgrade_on_oom: bool = True
    method: str | None = None  # None: per profile, the first method that accepts it
    method_params: Mapping[str, Any] = field(default_factory=dict)
    start_unix: float | None = None  # None: the server's own start
    time_dilation: float = 1.0
    roster: frozenset[str] | None = None  # None: any id may join; else messages from others are refused
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Stop once an evaluated version reaches it, so the model left is the one that did: a stop
    # rule outside the server would see it late and let later merges replace it.
    target_accuracy: float | None = None


def load_server_config(path: str | Path, broker: str | None = None) -> ServerConfig:
    p = Path(path)
    file = str(p)
    data = load_toml(p)
    check_tables(file, data, ("server", "rounds", "strategy", "train", "assign", "method", "clock"))
    srv = TomlTable(file, "server", data.get("server", {}), _SERVER_KEYS)
    rnd = TomlTable(file, "rounds", data.get("rounds", {}), _ROUND_KEYS)
    trn = TomlTable(file, "train", data.get("train", {}), _TRAIN_KEYS)
    asg = TomlTable(file, "assign", data.get("assign", {}), _ASSIGN_KEYS)
    clk = TomlTable(file, "clock", data.get("clock", {}), _CLOCK_KEYS)

    def resolve(text: str) -> Path:
        q = Path(text)
        return q if q.is_absolute() else p.parent / q

    strategy = rnd.string("strategy", STRATEGY_NAMES, default=DEFAULT_STRATEGY)
    params = dict(data.get("strategy", {}))
    try:
        get_strategy(strategy, **params)  # validate now: unknown parameter or bad value names itself
    except ConfigError as exc:
        raise ConfigError(f"{file}: [strategy] {exc}") from None
    time_limit = rnd.optional_number("time_limit_s", 0.0, 1e7, lo_open=True)
    timeout = rnd.number("task_timeout_s", 0.0, 1e7, lo_open=True, default=DEFAULT_TASK_TIMEOUT_S)
    target = rnd.integer("target_version", 1, 10**7) if "target_version" in rnd.data else None
    engine = EngineConfig(
        target_version=target, time_limit_s=time_limit, task_timeout_s=timeout,
        min_devices=rnd.integer("min_devices", 0, 100_000, default=1),
        eval_every=rnd.integer("eval_every", 0, 10**6, default=1),
        max_devices=rnd.integer("max_devices", 1, 10**6, default=10_000),
        shard_samples=_shard_samples(file, asg.data.get("shard_samples", {})),
    )
    train = TrainKnobs(
        local_steps=trn.integer("local_steps", 0, 10**7, default=20),
        local_epochs=trn.integer("local_epochs", 0, 10**5, default=0),
        lr=trn.number("lr", 0.0, 100.0, default=0.1, lo_open=True),
        batch_size=trn.integer("batch_size", 1, 1 << 16, default=32),
        upload=trn.string("upload", ("weights", "delta"), default="weights"),
        encoding=trn.string("encoding", ("dense", "fp16"), default="dense"),
    )
    if train.local_steps == 0 and train.local_epochs == 0:
        raise ConfigError(f"{file}: [train] needs local_steps > 0 or local_epochs > 0")
    devices = asg.data.get("devices", {})
    if not isinstance(devices, dict) or not all(isinstance(v, str) for v in devices.values()):
        raise ConfigError(f"{file}: [assign] devices must map device ids to profile strings")
    def optional_path(key: str) -> str | None:
        text = srv.optional_string(key)
        return None if text is None else str(resolve(text))

    run_id = srv.string("run_id")
    if not ID_PATTERN.fullmatch(run_id):
        raise ConfigError(f"{file}: [server] run_id must match {ID_PATTERN.pattern}, got {run_id!r}")
    method, method_params = method_table(file, data.get("method"))
    canonical = canonical_profile(file, method, method_params)
    default_profile = canonical(asg.string("default", default="dense"))
    return ServerConfig(
        server_id=srv.string("id", default="server"),
        root=_root(file, srv.string("root")),
        artifacts=resolve(srv.string("artifacts")),
        eval_data=resolve(srv.string("eval_data")),
        broker=broker or srv.string("broker", default="mqtt://127.0.0.1:1883"),
        credentials=resolve(srv.string("credentials")),
        run_id=run_id,
        ca_file=optional_path("ca_file"),
        cert_file=optional_path("cert_file"),
        key_file=optional_path("key_file"),
        strategy=strategy,
        strategy_params=params,
        target_accuracy=rnd.optional_number("target_accuracy", 0.0, 1.0, lo_open=True),
        engine=engine,
        train=train,
        default_profile=default_profile,
        device_profiles={str(k): v if v == DEVICE_CHOICE else canonical(v) for k, v in devices.items()},
        seed=srv.integer("seed", 0, 2**31, default=0),
        downgrade_on_oom=asg.boolean("downgrade_on_oom", default=True),
        method=method,
        method_params=method_params,
        start_unix=clk.optional_number("start_unix", 0.0, 1e11),
        time_dilation=clk.number("dilation", 1.0, 1000.0, default=1.0),
        roster=frozenset(srv.strings("roster")) if "roster" in srv.data else None,
    )


def _root(file: str, root: str) -> str:
    try:
        return check_topic_root(root)
    except ConfigError as exc:
        raise ConfigError(f"{file}: [server] root: {exc}") from None


def _shard_samples(file: str, raw: Any) -> dict[str, int]:
    """[assign] shard_samples = { dev0 = 240 }: what each device's shard holds (the campaign knows
    it), a cap on the n_samples its updates may claim."""
    if not isinstance(raw, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                            for v in raw.values()):
        raise ConfigError(f"{file}: [assign] shard_samples must map device ids to sample counts >= 0")
    return {str(k): int(v) for k, v in raw.items()}


def method_table(file: str, raw: Any) -> tuple[str | None, dict[str, Any]]:
    """(name, checked parameters) of a [method] table; (None, {}) without one."""
    if raw is None:
        return None, {}
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise ConfigError(f"{file}: [method] needs name = one of {', '.join(METHOD_NAMES)}")
    table = dict(raw)
    name = table.pop("name")
    try:
        return check_name(name), spec(name).params(table)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None


def canonical_profile(file: str, method: str | None, params: Mapping[str, Any]) -> Callable[[str], str]:
    """Profile text -> canonical form under `method` (None: the first method accepting it)."""

    def canonical(text: str) -> str:
        try:
            return spec(method).parse_profile(text, params) if method else device_profile(text)
        except ConfigError as exc:
            raise ConfigError(f"{file}: profile {text!r}: {exc}") from None

    return canonical
