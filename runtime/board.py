"""Board configs: what one kind of board is (cores, RAM, speed, power, sensor), from its TOML.

One TOML per board kind lives in `firmware_configs/`. The testbed reads it to emulate the board
(CPU quota from `cores` and `speed_factor`, memory cap = `ram_mb - os_reserve_mb`, the power
model); a real board reads its own config to pick its power sensor. That is why this lives in
`runtime/` and needs only the standard library.

Layout of a file (every key is checked; unknown keys and wrong types are errors that name the
file, the table and the key):

    [board]   name, description, os, cores, ram_mb, os_reserve_mb, speed_factor, cgroup_version
    [power]   p_idle_w, p_max_w, measurement_point          # P = P_idle + (P_max - P_idle) * u
    [sensor]  kind, plus the keys that kind takes (see SENSOR_KEYS)
    [link.<kind>]  up_mbit, down_mbit: the board's sustained link figures, kind = wifi | ethernet
              (optional; a campaign's `link = { kind = "wifi" }` takes them; testbed.links)
    [sources] one note per field saying where its number comes from (speed_factor, power required;
              link, when [link] is given)
    [runtime] optional: python (the OS's CPython, "3.11"), arch ("aarch64"), execution_providers
              (ONNX Runtime's, in order of preference; CPU is always the fallback)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError
from runtime.record import record
from runtime.tomlconf import TomlTable, tomllib

SENSOR_KINDS = ("model", "ina3221-hwmon", "ina3221-iio", "pmic-vcgencmd", "ina2xx-hwmon", "rapl")
# Where a power figure is taken. Numbers from different points differ by PSU losses (wall vs 5 V
# input) and by the carrier board (module rails exclude it), so P_idle and P_max must share one.
# "cpu-package" is RAPL's point: the x86 package only, used when the host itself is measured.
MEASUREMENT_POINTS = ("wall", "board-5v", "module-vdd-in", "module-rails-sum", "cpu-package")
CGROUP_VERSIONS = (1, 2)

# Each sensor kind takes only its own keys, so a typo or a key meant for another kind is an error.
SENSOR_KEYS: Mapping[str, frozenset[str]] = {
    "model": frozenset({"kind"}),
    "ina3221-hwmon": frozenset({"kind", "measurement_point", "i2c_devices", "total_rail"}),
    "ina3221-iio": frozenset({"kind", "measurement_point", "i2c_devices", "total_rail"}),
    "pmic-vcgencmd": frozenset(
        {"kind", "measurement_point", "command", "calib_scale", "calib_offset_w", "min_interval_s"}
    ),
    "ina2xx-hwmon": frozenset({"kind", "measurement_point", "hwmon_names", "i2c_device"}),
    "rapl": frozenset({"kind", "measurement_point", "rapl_zones"}),
}
_ALL_SENSOR_KEYS = frozenset().union(*SENSOR_KEYS.values())
# The rail that already is the module total, per kind, when the config does not name one.
DEFAULT_TOTAL_RAIL = {"ina3221-hwmon": "VDD_IN", "ina3221-iio": "POM_5V_IN"}
DEFAULT_INA2XX_NAMES = ("ina209", "ina219", "ina220", "ina226", "ina230", "ina231", "ina238", "ina260")
# Each `vcgencmd` call spawns a process; at 50 Hz it slowed the workload about 6x (platform.md 2.2).
PMIC_MIN_INTERVAL_S = 0.1

_BOARD_KEYS = ("name", "description", "os", "cores", "ram_mb", "os_reserve_mb", "speed_factor", "cgroup_version")
_POWER_KEYS = ("p_idle_w", "p_max_w", "measurement_point")
SOURCE_KEYS = frozenset({"cores", "ram_mb", "os_reserve_mb", "speed_factor", "cgroup_version", "power", "sensor",
                         "link"})
BOARD_LINK_KINDS = ("wifi", "ethernet")
_LINK_KEYS = frozenset({"up_mbit", "down_mbit"})
_REQUIRED_SOURCES = ("speed_factor", "power")

ENV_CONFIG_DIR = "ORCHARD_FIRMWARE_CONFIGS"
_RUNTIME_KEYS = frozenset({"python", "arch", "execution_providers"})
ARCHES = ("aarch64", "x86_64", "armv7l")
CPU_PROVIDER = "CPUExecutionProvider"
_PYTHON_VERSION = re.compile(r"3\.(\d{1,2})")


@record
class PowerModel:
    """Linear power model `P = P_idle + (P_max - P_idle) * u`, both ends at one measurement point."""

    p_idle_w: float
    p_max_w: float
    measurement_point: str

    def power_w(self, utilisation: float) -> float:
        """Power at CPU utilisation u (fraction of the board's cores busy), clamped to [0, 1]."""
        u = min(1.0, max(0.0, utilisation)) if math.isfinite(utilisation) else 0.0
        return self.p_idle_w + (self.p_max_w - self.p_idle_w) * u


@record
class SensorConfig:
    """Which power sensor the board has. Fields not used by `kind` keep their defaults."""

    kind: str
    measurement_point: str  # for "model", the power model's point
    i2c_devices: tuple[str, ...] = ()  # ina3221-*: "<bus>-<addr>", e.g. "1-0040"
    total_rail: str | None = None  # ina3221-*: rail that is already the module total, if present
    command: tuple[str, ...] = ("vcgencmd", "pmic_read_adc")  # pmic-vcgencmd
    calib_scale: float = 1.0  # pmic-vcgencmd: P = scale * sum(V*A) + offset
    calib_offset_w: float = 0.0
    min_interval_s: float = PMIC_MIN_INTERVAL_S
    hwmon_names: tuple[str, ...] = DEFAULT_INA2XX_NAMES  # ina2xx-hwmon: accepted hwmon `name`s
    i2c_device: str | None = None  # ina2xx-hwmon: pick this one when several match
    rapl_zones: tuple[str, ...] = ()  # rapl: zone `name`s to sum; empty = every "package-N"


@record
class BoardRuntime:
    """What the board's OS gives the runtime: its CPython, its architecture, and the ONNX Runtime
    execution providers to try (a Jetson with a CUDA-enabled wheel: CUDA, then CPU)."""

    python: str = "3.11"  # Pi OS Bookworm's; JetPack 5 ships 3.8, JetPack 6 3.10
    arch: str = "aarch64"
    execution_providers: tuple[str, ...] = (CPU_PROVIDER,)


@record
class BoardConfig:
    name: str
    description: str
    os: str
    cores: int
    ram_mb: int
    os_reserve_mb: int
    speed_factor: float  # per-core speed relative to the reference x86 core (see firmware_configs)
    cgroup_version: int
    power: PowerModel
    sensor: SensorConfig
    sources: tuple[tuple[str, str], ...]
    path: str
    links: tuple[tuple[str, float, float], ...] = ()  # (kind, up_mbit, down_mbit) per [link.<kind>]
    runtime: BoardRuntime = BoardRuntime()

    @property
    def memory_cap_mb(self) -> int:
        """RAM left for Orchard once the OS has its allowance: the emulated memory.max."""
        return self.ram_mb - self.os_reserve_mb

    @property
    def memory_cap_bytes(self) -> int:
        return self.memory_cap_mb * 1024 * 1024

    def source(self, field: str) -> str | None:
        return dict(self.sources).get(field)


def _display(path: Path) -> str:
    """The path as a user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def parse_board(data: Mapping[str, Any], file: str, expected_name: str | None = None) -> BoardConfig:
    """Validate a parsed TOML document; `file` names it in errors."""
    for key, value in data.items():
        if key not in ("board", "power", "sensor", "sources", "link", "runtime"):
            where = "table" if isinstance(value, dict) else "top-level key"
            raise ConfigError(f"{file}: unknown {where} '{key}' (expected [board], [power], [sensor], [sources], "
                              "[link.<kind>], [runtime])")
    tables: dict[str, Mapping[str, Any]] = {}
    for name in ("board", "power", "sensor", "sources"):
        table = data.get(name)
        if table is None:
            raise ConfigError(f"{file}: missing table [{name}]")
        if not isinstance(table, dict):
            raise ConfigError(f"{file}: '{name}' must be a table [{name}], got {type(table).__name__}")
        tables[name] = table

    b = TomlTable(file, "board", tables["board"], frozenset(_BOARD_KEYS))
    name = b.string("name")
    if expected_name is not None and name != expected_name:
        raise b.fail(f"[board] name '{name}' does not match the file name '{expected_name}.toml'")
    description = b.string("description")
    board_os = b.string("os")
    cores = b.integer("cores", 1, 256)
    ram_mb = b.integer("ram_mb", 64, 1 << 20)
    os_reserve_mb = b.integer("os_reserve_mb", 0, ram_mb - 64)  # leave Orchard at least 64 MB
    speed_factor = b.number("speed_factor", 0.0, 8.0, lo_open=True)
    cgroup_version = b.integer("cgroup_version", 1, 2)

    p = TomlTable(file, "power", tables["power"], frozenset(_POWER_KEYS))
    p_idle_w = p.number("p_idle_w", 0.0, 1000.0)
    p_max_w = p.number("p_max_w", 0.0, 1000.0)
    if p_max_w <= p_idle_w:
        raise p.fail(f"[power] p_max_w must be > p_idle_w ({p_idle_w}), got {p_max_w}")
    power = PowerModel(p_idle_w, p_max_w, p.string("measurement_point", MEASUREMENT_POINTS))

    sensor = _parse_sensor(file, tables["sensor"], power)

    s = TomlTable(file, "sources", tables["sources"], SOURCE_KEYS)
    sources = tuple((key, s.string(key)) for key in sorted(tables["sources"]))
    for key in _REQUIRED_SOURCES + (("link",) if "link" in data else ()):
        if key not in tables["sources"]:
            raise s.fail(f"missing key '{key}' in [sources] (say where the number comes from)")
    links = _parse_links(file, data.get("link", {}))

    return BoardConfig(
        name=name,
        description=description,
        os=board_os,
        cores=cores,
        ram_mb=ram_mb,
        os_reserve_mb=os_reserve_mb,
        speed_factor=speed_factor,
        cgroup_version=cgroup_version,
        power=power,
        sensor=sensor,
        sources=sources,
        path=file,
        links=links,
        runtime=_parse_runtime(file, data.get("runtime", {})),
    )


def _parse_links(file: str, table: Any) -> tuple[tuple[str, float, float], ...]:
    if not isinstance(table, dict):
        raise ConfigError(f"{file}: 'link' must be tables [link.wifi] / [link.ethernet], got {type(table).__name__}")
    out = []
    for kind, figures in table.items():
        if kind not in BOARD_LINK_KINDS or not isinstance(figures, dict):
            raise ConfigError(f"{file}: [link.{kind}] is unknown; expected [link.wifi] or [link.ethernet]")
        t = TomlTable(file, f"link.{kind}", figures, _LINK_KEYS)
        out.append((kind, t.number("up_mbit", 0.0, 100_000.0, lo_open=True),
                    t.number("down_mbit", 0.0, 100_000.0, lo_open=True)))
    return tuple(out)


def _parse_runtime(file: str, table: Any) -> BoardRuntime:
    if not isinstance(table, dict):
        raise ConfigError(f"{file}: 'runtime' must be a table [runtime], got {type(table).__name__}")
    t = TomlTable(file, "runtime", table, _RUNTIME_KEYS)
    default = BoardRuntime()
    python = t.string("python", default=default.python)
    if not _PYTHON_VERSION.fullmatch(python):
        raise t.fail(f"[runtime] python must be a CPython version like \"3.11\", got {python!r}")
    providers = t.strings("execution_providers", default=default.execution_providers)
    if CPU_PROVIDER not in providers:
        providers = (*providers, CPU_PROVIDER)  # the fallback when the wheel or the device lacks the others
    return BoardRuntime(python=python, arch=t.string("arch", ARCHES, default=default.arch),
                        execution_providers=providers)


def _parse_sensor(file: str, table: Mapping[str, Any], power: PowerModel) -> SensorConfig:
    kind = TomlTable(file, "sensor", table, _ALL_SENSOR_KEYS).string("kind", SENSOR_KINDS)
    t = TomlTable(file, "sensor", table, SENSOR_KEYS[kind])  # a key of another kind is unknown here
    if kind == "model":
        return SensorConfig(kind=kind, measurement_point=power.measurement_point)
    point = t.string("measurement_point", MEASUREMENT_POINTS)
    if kind in ("ina3221-hwmon", "ina3221-iio"):
        return SensorConfig(
            kind=kind,
            measurement_point=point,
            i2c_devices=t.strings("i2c_devices"),
            total_rail=t.string("total_rail", default=DEFAULT_TOTAL_RAIL[kind]),
        )
    if kind == "pmic-vcgencmd":
        return SensorConfig(
            kind=kind,
            measurement_point=point,
            command=t.strings("command", default=SensorConfig.command),
            calib_scale=t.number("calib_scale", 0.0, 10.0, default=1.0, lo_open=True),
            calib_offset_w=t.number("calib_offset_w", -100.0, 100.0, default=0.0),
            min_interval_s=t.number("min_interval_s", PMIC_MIN_INTERVAL_S, 60.0, default=PMIC_MIN_INTERVAL_S),
        )
    if kind == "ina2xx-hwmon":
        device = t.string("i2c_device") if "i2c_device" in table else None
        return SensorConfig(
            kind=kind,
            measurement_point=point,
            hwmon_names=t.strings("hwmon_names", default=DEFAULT_INA2XX_NAMES),
            i2c_device=device,
        )
    return SensorConfig(  # rapl
        kind=kind,
        measurement_point=point,
        rapl_zones=t.strings("rapl_zones", default=(), allow_empty=True),
    )


def configs_dir() -> Path:
    """`$ORCHARD_FIRMWARE_CONFIGS`, else `firmware_configs/` next to the `runtime` package
    (true both in the repository and in a board bundle)."""
    override = os.environ.get(ENV_CONFIG_DIR)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "firmware_configs"


def list_boards(directory: str | Path | None = None) -> list[str]:
    """Names of the board kinds that have a config, sorted."""
    root = Path(directory) if directory is not None else configs_dir()
    return sorted(p.stem for p in root.glob("*.toml"))


def load_board(name_or_path: str | Path, directory: str | Path | None = None) -> BoardConfig:
    """Load a board by name (`rpi5`, looked up in the configs directory) or by path to a TOML."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or os.sep in text or "/" in text:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"board config not found: {text}")
    else:
        root = Path(directory) if directory is not None else configs_dir()
        path = root / f"{text}.toml"
        if not path.is_file():
            known = ", ".join(list_boards(root)) or "none"
            raise ConfigError(f"unknown board '{text}' (known boards: {known})")
    file = _display(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
    return parse_board(data, file, expected_name=path.stem)
