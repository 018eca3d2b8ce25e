"""Readers for real power sensors, each behind the `PowerSource` interface.

Every reader takes a `sysfs_root` (default "/") so tests run it against a fake tree laid out like
the real one; the Pi 5 reader runs a configurable command. Units differ per driver and are
converted at the one place each file is read:

    RAPL powercap     /sys/class/powercap/intel-rapl:N/energy_uj        µJ, wraps at max_energy_range_uj
    INA3221 hwmon     .../ina3221/<bus>-<addr>/hwmon/hwmon*/in{N}_input  mV, curr{N}_input mA
    INA3221 iio (JP4) .../ina3221x/<bus>-<addr>/iio:device*/in_power{N}_input  mW
    INA2xx hwmon      /sys/class/hwmon/hwmon*/power1_input               µW
    Pi 5 PMIC         `vcgencmd pmic_read_adc`: "VDD_CORE_A current(7)=1.54A", "VDD_CORE_V volt(15)=0.88V"

Constructors find the files and raise `SensorUnavailableError` when the sensor is not there;
`read_power_w` raises `PowerReadError` when a reading fails. `runtime.energy` picks one.
"""

from __future__ import annotations

import math
import re
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from runtime.errors import EXIT_SENSOR, OrchardError, register_exit_code
from runtime.record import record

Clock = Callable[[], float]


class SensorUnavailableError(OrchardError):
    """The configured power sensor is not on this machine or cannot be read by this user."""


class PowerReadError(OrchardError):
    """A power reading failed or came back malformed."""


register_exit_code(SensorUnavailableError, EXIT_SENSOR)
register_exit_code(PowerReadError, EXIT_SENSOR)


class PowerSource(ABC):
    kind: str = ""
    # True when a reading is the mean power since the previous reading (RAPL's energy counter, the
    # power model over CPU time): the meter then integrates it with the backward rectangle, which
    # is exact. False for sensors that report power at an instant (INA3221, INA2xx, the PMIC):
    # the trapezoid, exact for power that changes linearly between readings.
    interval_mean: bool = False

    def __init__(self, name: str, measurement_point: str) -> None:
        self.name = name
        self.measurement_point = measurement_point
        self.fallback_reason: str | None = None  # set when this source stands in for a missing sensor

    @abstractmethod
    def read_power_w(self) -> float:
        """Current (or, for RAPL, since-last-call average) power in watts."""


def read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise PowerReadError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_number(path: Path) -> float:
    text = read_text(path)
    try:
        value = float(text)
    except ValueError:
        raise PowerReadError(f"{path}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise PowerReadError(f"{path}: value is not finite: {text!r}")
    return value


def _root(sysfs_root: str | Path) -> Path:
    return Path(sysfs_root)


# ---------------------------------------------------------------------------------------------
# RAPL powercap (x86 hosts)


class RaplSource(PowerSource):
    """Average package power between calls, from the cumulative `energy_uj` counters."""

    kind = "rapl"
    interval_mean = True

    def __init__(self, sysfs_root: str | Path = "/", zones: Sequence[str] = (), clock: Clock = time.monotonic):
        base = _root(sysfs_root) / "sys/class/powercap"
        chosen: list[Path] = []
        for zone in sorted(base.glob("intel-rapl:*")):
            if not (zone / "energy_uj").exists():
                continue
            zone_name = read_text(zone / "name")
            # Default: top-level package zones only. Subzones (core, uncore, dram) are inside the
            # package figure, and psys contains it, so adding them would double count.
            if (zone_name in zones) if zones else (zone.name.count(":") == 1 and zone_name.startswith("package-")):
                chosen.append(zone)
        if not chosen:
            wanted = ", ".join(zones) if zones else "package-N"
            raise SensorUnavailableError(f"no RAPL zone {wanted} under {base}")
        self._zones = chosen
        self._ranges_uj = [read_number(z / "max_energy_range_uj") for z in chosen]
        self._clock = clock
        try:
            self._last_uj = self._energies_uj()
        except PowerReadError as exc:  # energy_uj is root-only since CVE-2020-8694
            raise SensorUnavailableError(f"RAPL not readable: {exc}") from None
        self._last_t = clock()
        self._last_power_w = 0.0
        names = "+".join(read_text(z / "name") for z in chosen)
        super().__init__(f"rapl:{names}", "cpu-package")

    def _energies_uj(self) -> list[float]:
        return [read_number(z / "energy_uj") for z in self._zones]

    def read_power_w(self) -> float:
        now_uj, t = self._energies_uj(), self._clock()
        dt = t - self._last_t
        if dt <= 0:
            return self._last_power_w
        delta_uj = 0.0
        for now, last, span in zip(now_uj, self._last_uj, self._ranges_uj):
            # The counter restarts from 0 after max_energy_range_uj: one wrap per interval at most
            # (tens of minutes at full load), so adding the range once recovers the true delta.
            delta_uj += now - last if now >= last else now + span - last
        self._last_uj, self._last_t = now_uj, t
        self._last_power_w = delta_uj / 1e6 / dt
        return self._last_power_w


# ---------------------------------------------------------------------------------------------
# Jetson INA3221


@record
class _Rail:
    label: str
    paths: tuple[Path, ...]  # hwmon: (mV file, mA file); iio: (mW file,)

    def power_w(self) -> float:
        if len(self.paths) == 2:
            return read_number(self.paths[0]) * read_number(self.paths[1]) / 1e6
        return read_number(self.paths[0]) / 1e3


def gpu_rail(source: PowerSource) -> _Rail | None:
    """The INA3221 rail that feeds the GPU, if the board's sensor has one: POM_5V_GPU (Nano),
    VDD_GPU_SOC (AGX Orin), VDD_CPU_GPU_CV (Orin Nano/NX, Xavier NX: CPU, GPU and CV together)."""
    rails: list[_Rail] = getattr(source, "rails", [])
    return next((r for r in rails if "GPU" in r.label.upper()), None)


def _pick_rails(rails: list[_Rail], total_rail: str | None, where: str) -> tuple[list[_Rail], str]:
    """The total rail alone when the board has one (summing sub-rails onto it would double count,
    jetson_stats#51); otherwise every real rail, as on AGX Orin, which has no VDD_IN."""
    if not rails:
        raise SensorUnavailableError(f"no INA3221 rails under {where}")
    total = [r for r in rails if total_rail and r.label == total_rail]
    if total:
        return total[:1], total[0].label
    return rails, "sum(" + "+".join(r.label for r in rails) + ")"


def _is_real_rail(label: str) -> bool:
    # "NC" marks an unconnected channel (AGX Orin 1-0041); in7 sums the shunt voltages of the others.
    return label.upper() != "NC" and not label.lower().startswith("sum of shunt")


class Ina3221HwmonSource(PowerSource):
    """JetPack 5/6 mainline `ina3221` hwmon driver: power = bus mV x current mA per channel."""

    kind = "ina3221-hwmon"

    def __init__(
        self,
        sysfs_root: str | Path,
        i2c_devices: Sequence[str],
        total_rail: str | None,
        measurement_point: str = "module-vdd-in",
    ):
        rails: list[_Rail] = []
        drivers = _root(sysfs_root) / "sys/bus/i2c/drivers/ina3221"
        for device in i2c_devices:
            # The hwmon index changes between boots (hwmon1, hwmon2, ...), so glob it.
            for hwmon in sorted((drivers / device / "hwmon").glob("hwmon*")):
                for label_file in sorted(hwmon.glob("in*_label")):
                    channel = label_file.name[2 : -len("_label")]
                    label = read_text(label_file)
                    volts, amps = hwmon / f"in{channel}_input", hwmon / f"curr{channel}_input"
                    enable = hwmon / f"in{channel}_enable"
                    if not _is_real_rail(label) or not (volts.exists() and amps.exists()):
                        continue
                    if enable.exists() and read_text(enable) == "0":
                        continue
                    rails.append(_Rail(label, (volts, amps)))
        self.rails = rails
        self._rails, what = _pick_rails(rails, total_rail, f"{drivers}/{{{','.join(i2c_devices)}}}")
        super().__init__(f"ina3221-hwmon:{what}", measurement_point)

    def read_power_w(self) -> float:
        return sum(r.power_w() for r in self._rails)


class Ina3221IioSource(PowerSource):
    """JetPack 4 out-of-tree `ina3221x` iio driver: `in_power{N}_input` is already mW."""

    kind = "ina3221-iio"

    def __init__(
        self,
        sysfs_root: str | Path,
        i2c_devices: Sequence[str],
        total_rail: str | None,
        measurement_point: str = "module-vdd-in",
    ):
        rails: list[_Rail] = []
        drivers = _root(sysfs_root) / "sys/bus/i2c/drivers/ina3221x"
        for device in i2c_devices:
            for iio in sorted((drivers / device).glob("iio:device*")):
                for name_file in sorted(iio.glob("rail_name_*")):
                    channel = name_file.name[len("rail_name_") :]
                    label = read_text(name_file)
                    power = iio / f"in_power{channel}_input"
                    if _is_real_rail(label) and power.exists():
                        rails.append(_Rail(label, (power,)))
        self.rails = rails
        self._rails, what = _pick_rails(rails, total_rail, f"{drivers}/{{{','.join(i2c_devices)}}}")
        super().__init__(f"ina3221-iio:{what}", measurement_point)

    def read_power_w(self) -> float:
        return sum(r.power_w() for r in self._rails)


# ---------------------------------------------------------------------------------------------
# Raspberry Pi 5 PMIC

_PMIC_LINE = re.compile(r"^\s*(?P<rail>\S+)_(?P<unit>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-+0-9.eE]+)[AV]\s*$")


def parse_pmic_adc(text: str) -> float:
    """Σ V·A over the rails that have both a current and a voltage line. EXT5V_V and BATT_V have
    no current channel, so the 5 V input path and USB are not in the sum (platform.md 2.2)."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        match = _PMIC_LINE.match(line)
        if match:
            (amps if match["unit"] == "A" else volts)[match["rail"]] = float(match["value"])
    paired = amps.keys() & volts.keys()
    if not paired:
        raise PowerReadError(f"no current/voltage rail pairs in pmic_read_adc output: {text[:80]!r}")
    return sum(amps[rail] * volts[rail] for rail in paired)


class PmicVcgencmdSource(PowerSource):
    """Pi 5: `vcgencmd pmic_read_adc`, optionally calibrated as P = a·Σ + b against a USB meter."""

    kind = "pmic-vcgencmd"

    def __init__(
        self,
        command: Sequence[str],
        calib_scale: float = 1.0,
        calib_offset_w: float = 0.0,
        min_interval_s: float = 0.1,
        measurement_point: str = "board-5v",
        clock: Clock = time.monotonic,
        timeout_s: float = 2.0,
    ):
        self._command = list(command)
        self._scale, self._offset_w = calib_scale, calib_offset_w
        self._min_interval_s, self._clock, self._timeout_s = min_interval_s, clock, timeout_s
        self._last_t: float | None = None
        self._last_power_w = 0.0
        super().__init__(f"pmic-vcgencmd:{' '.join(self._command)}", measurement_point)

    def read_power_w(self) -> float:
        now = self._clock()
        # Every call spawns a process, so repeat the last value rather than sample faster than
        # min_interval_s (≥ 0.1 s): sampling at 50 Hz slowed the workload about 6x.
        if self._last_t is not None and now - self._last_t < self._min_interval_s:
            return self._last_power_w
        try:
            done = subprocess.run(self._command, capture_output=True, text=True, timeout=self._timeout_s, check=False)
        except FileNotFoundError:
            raise SensorUnavailableError(f"command not found: {self._command[0]}") from None
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PowerReadError(f"{' '.join(self._command)} failed: {exc}") from None
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()[:1]
            raise PowerReadError(f"{' '.join(self._command)} exited {done.returncode}: {''.join(why)}")
        self._last_power_w = self._scale * parse_pmic_adc(done.stdout) + self._offset_w
        self._last_t = now
        return self._last_power_w


# ---------------------------------------------------------------------------------------------
# INA219 / INA226 / INA260 ... on the 5 V feed, kernel ina2xx hwmon driver


class Ina2xxHwmonSource(PowerSource):
    kind = "ina2xx-hwmon"

    def __init__(
        self,
        sysfs_root: str | Path,
        names: Sequence[str],
        i2c_device: str | None = None,
        measurement_point: str = "board-5v",
    ):
        base = _root(sysfs_root) / "sys/class/hwmon"
        found = [
            h
            for h in sorted(base.glob("hwmon*"))
            if (h / "name").exists() and read_text(h / "name") in names and (h / "power1_input").exists()
        ]
        if i2c_device is not None:  # `device` links to the i2c client, e.g. .../i2c-1/1-0040
            found = [h for h in found if (h / "device").resolve().name == i2c_device]
        if not found:
            where = f" at {i2c_device}" if i2c_device else ""
            raise SensorUnavailableError(f"no {'/'.join(names)} hwmon device{where} under {base}")
        if len(found) > 1:
            raise SensorUnavailableError(
                f"{len(found)} INA2xx hwmon devices under {base}; set [sensor] i2c_device to pick one"
            )
        self._power_file = found[0] / "power1_input"
        super().__init__(f"ina2xx-hwmon:{read_text(found[0] / 'name')}", measurement_point)

    def read_power_w(self) -> float:
        return read_number(self._power_file) / 1e6  # power1_input is µW
