"""Power sources behind one interface, and an energy meter that integrates their samples.

A `PowerSource` has `name`, `kind`, `measurement_point`, `fallback_reason` and
`read_power_w() -> float`. The sensor readers (RAPL, Jetson INA3221 hwmon and iio, Pi 5 PMIC,
INA2xx hwmon) live in `runtime.power_sensors` and are re-exported here; this module adds the
power model `P = P_idle + (P_max - P_idle)·u` driven by CPU utilisation, the factory that picks
a board's source, and `EnergyMeter`.

`make_power_source` builds the source a board config asks for and, when that sensor is absent
or unreadable here, falls back to the board's power model and records why in `fallback_reason`
(telemetry carries both, so a trace says whether its joules were measured or modelled).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from runtime.board import BoardConfig, PowerModel, SensorConfig
from runtime.power_sensors import (
    Clock,
    Ina2xxHwmonSource,
    Ina3221HwmonSource,
    Ina3221IioSource,
    PmicVcgencmdSource,
    PowerReadError,
    PowerSource,
    RaplSource,
    SensorUnavailableError,
    parse_pmic_adc,
    read_number,
    read_text,
)
from runtime.record import record

__all__ = [
    "CpuTimeUtilisation",
    "EnergyMeter",
    "Ina2xxHwmonSource",
    "Ina3221HwmonSource",
    "Ina3221IioSource",
    "ModelSource",
    "PmicVcgencmdSource",
    "PowerReadError",
    "PowerSample",
    "PowerSource",
    "RaplSource",
    "SensorUnavailableError",
    "cgroup_cpu_time_s",
    "make_power_source",
    "make_sensor_source",
    "parse_pmic_adc",
    "system_cpu_time_s",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The model, from CPU utilisation


def system_cpu_time_s() -> float:
    """Busy CPU seconds of the whole machine (all but idle and iowait), for a real board."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def cgroup_cpu_time_s(cgroup_dir: str | Path) -> float:
    """CPU seconds used by one cgroup: v2 `cpu.stat` usage_usec, else v1 `cpuacct.usage` (ns)."""
    directory = Path(cgroup_dir)
    stat = directory / "cpu.stat"
    if stat.exists():
        for line in read_text(stat).splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return float(value) / 1e6
    return read_number(directory / "cpuacct.usage") / 1e9


class CpuTimeUtilisation:
    """u = Δ(CPU seconds used) / (quota cores × Δwall seconds), clamped to [0, 1].

    `quota_cores` is the board's core count on a real board, the emulated quota in the testbed.
    """

    def __init__(self, cpu_time_s: Callable[[], float], quota_cores: float, clock: Clock = time.monotonic):
        if quota_cores <= 0:
            raise ValueError(f"quota_cores must be > 0, got {quota_cores}")
        self._cpu_time_s, self._quota_cores, self._clock = cpu_time_s, quota_cores, clock
        self._last_cpu_s, self._last_t = cpu_time_s(), clock()
        self._last_u = 0.0

    def __call__(self) -> float:
        cpu_s, t = self._cpu_time_s(), self._clock()
        dt = t - self._last_t
        if dt <= 0:
            return self._last_u
        u = (cpu_s - self._last_cpu_s) / (self._quota_cores * dt)
        self._last_cpu_s, self._last_t = cpu_s, t
        self._last_u = min(1.0, max(0.0, u))
        return self._last_u


class ModelSource(PowerSource):
    """P = P_idle + (P_max − P_idle)·u, at the measurement point the model's numbers were taken."""

    kind = "model"
    interval_mean = True  # the utilisation it is given is the CPU share since the last reading

    def __init__(self, model: PowerModel, utilisation: Callable[[], float], fallback_reason: str | None = None):
        super().__init__(f"model:{model.p_idle_w:g}-{model.p_max_w:g}W", model.measurement_point)
        self._model, self._utilisation = model, utilisation
        self.fallback_reason = fallback_reason

    def read_power_w(self) -> float:
        return self._model.power_w(self._utilisation())


# ---------------------------------------------------------------------------------------------


def make_sensor_source(
    sensor: SensorConfig, sysfs_root: str | Path = "/", clock: Clock = time.monotonic
) -> PowerSource:
    """The sensor source a config names; raises SensorUnavailableError if it is not here."""
    point = sensor.measurement_point
    if sensor.kind == "rapl":
        return RaplSource(sysfs_root, sensor.rapl_zones, clock)
    if sensor.kind == "ina3221-hwmon":
        return Ina3221HwmonSource(sysfs_root, sensor.i2c_devices, sensor.total_rail, point)
    if sensor.kind == "ina3221-iio":
        return Ina3221IioSource(sysfs_root, sensor.i2c_devices, sensor.total_rail, point)
    if sensor.kind == "pmic-vcgencmd":
        return PmicVcgencmdSource(
            sensor.command, sensor.calib_scale, sensor.calib_offset_w, sensor.min_interval_s, point, clock
        )
    if sensor.kind == "ina2xx-hwmon":
        return Ina2xxHwmonSource(sysfs_root, sensor.hwmon_names, sensor.i2c_device, point)
    raise SensorUnavailableError(f"sensor kind {sensor.kind!r} has no reader")


def make_power_source(
    board: BoardConfig,
    sysfs_root: str | Path = "/",
    *,
    utilisation: Callable[[], float] | None = None,
    clock: Clock = time.monotonic,
) -> PowerSource:
    """The board's configured power source, or its power model with `fallback_reason` set.

    A sensor counts as present only if it is found *and* one reading succeeds, so a missing
    `vcgencmd`, a root-only `energy_uj` or a bad file is caught here, not mid-run.
    """
    if utilisation is None:
        utilisation = CpuTimeUtilisation(system_cpu_time_s, board.cores, clock)
    if board.sensor.kind == "model":
        return ModelSource(board.power, utilisation)
    try:
        source = make_sensor_source(board.sensor, sysfs_root, clock)
        source.read_power_w()
        return source
    except (SensorUnavailableError, PowerReadError) as exc:
        reason = f"{board.sensor.kind} unavailable: {exc}"
    log.warning("%s: using the power model instead (%s)", board.name, reason)
    return ModelSource(board.power, utilisation, fallback_reason=reason)


@record
class PowerSample:
    t_s: float
    power_w: float
    energy_j: float  # cumulative energy up to and including this sample


class EnergyMeter:
    """Integrates power samples over time, remembering the source.

    The rule follows what a reading means (`PowerSource.interval_mean`): the mean power since
    the previous reading (the power model, RAPL) is integrated with the backward rectangle
    `E += P_i · (t_i − t_{i−1})`, which is exact; a reading at an instant (INA3221, INA2xx, the
    Pi 5 PMIC) with the trapezoid, exact for power that is linear between readings. (The
    trapezoid over interval means underestimates every burst that starts and ends between two
    readings: per-task energy came out low by a median of 9 %.)

    `add(..., uncharged_s=x)` leaves the last x seconds before a reading out of the integral: time
    the board was powered off (see `runtime.telemetry.Sampler`). Per-task energy is the
    difference of two `energy_j` readings, so it is exactly the integral over the task.
    """

    def __init__(self, source: PowerSource, clock: Clock = time.monotonic, start_s: float | None = None) -> None:
        self.source = source
        self._clock = clock
        self._energy_j = 0.0
        self._first_t: float | None = start_s
        # (t_s, power_w) of the last good reading. `start_s` opens the integral before the first
        # reading (an interval-mean reading then covers [start_s, t_1]).
        self._last: tuple[float, float] | None = None if start_s is None else (start_s, math.nan)
        self.n_samples = 0
        self.read_errors = 0
        self.last_error: str | None = None

    @property
    def source_name(self) -> str:
        return self.source.name

    @property
    def energy_j(self) -> float:
        return self._energy_j

    @property
    def elapsed_s(self) -> float:
        return 0.0 if self._last is None or self._first_t is None else self._last[0] - self._first_t

    @property
    def mean_power_w(self) -> float:
        return self._energy_j / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def sample(self, uncharged_s: float = 0.0, t_s: float | None = None) -> PowerSample:
        """Read the source now and add the reading.

        A failed reading (a transient sysfs or vcgencmd error) is returned as power NaN and is
        not integrated; the next good sample bridges the gap from the last good one.
        `read_errors` and `last_error` say it happened, so a trace can show the hole.
        """
        t_s = self._clock() if t_s is None else t_s
        try:
            power_w = self.source.read_power_w()
        except PowerReadError as exc:
            self.read_errors += 1
            self.last_error = str(exc)
            return PowerSample(t_s, math.nan, self._energy_j)
        return self.add(t_s, power_w, uncharged_s)

    def add(self, t_s: float, power_w: float, uncharged_s: float = 0.0) -> PowerSample:
        if not (math.isfinite(t_s) and math.isfinite(power_w) and math.isfinite(uncharged_s)):
            raise ValueError(f"power sample must be finite, got t={t_s} P={power_w} uncharged={uncharged_s}")
        if self._last is None:
            self._first_t = t_s
        else:
            last_t, last_p = self._last
            if t_s < last_t:
                raise ValueError(f"power sample at t={t_s} s is before the previous one at {last_t} s")
            charged_s = max(0.0, t_s - last_t - max(0.0, uncharged_s))
            if self.source.interval_mean or math.isnan(last_p):
                self._energy_j += power_w * charged_s
            else:
                self._energy_j += 0.5 * (last_p + power_w) * charged_s
        self._last = (t_s, power_w)
        self.n_samples += 1
        return PowerSample(t_s, power_w, self._energy_j)
