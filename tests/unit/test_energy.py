"""Power sources against fake sysfs trees laid out like the real ones, and energy integration.

Each fake tree uses the real file names and units: RAPL µJ, INA3221 hwmon mV/mA, INA3221 iio mW,
INA2xx µW, and the Pi 5 `vcgencmd pmic_read_adc` text format.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from runtime.energy import (
    Ina2xxHwmonSource,
    Ina3221HwmonSource,
    Ina3221IioSource,
    PmicVcgencmdSource,
    PowerReadError,
    RaplSource,
    SensorUnavailableError,
    parse_pmic_adc,
)


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def put(path: Path, text: str | int | float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{text}\n")
    return path


# ---- RAPL ------------------------------------------------------------------------------------

MAX_RANGE_UJ = 262143328850


def rapl_tree(root: Path, package_uj: int = 1_000_000, core_uj: int = 500_000) -> Path:
    pc = root / "sys/class/powercap"
    put(pc / "intel-rapl/enabled", 1)  # the control type itself: no energy_uj, skipped
    for zone, name, uj in (("intel-rapl:0", "package-0", package_uj), ("intel-rapl:0:0", "core", core_uj)):
        put(pc / zone / "name", name)
        put(pc / zone / "energy_uj", uj)
        put(pc / zone / "max_energy_range_uj", MAX_RANGE_UJ)
    put(pc / "intel-rapl:1/name", "psys")  # contains the package: must not be added by default
    put(pc / "intel-rapl:1/energy_uj", 9_000_000)
    put(pc / "intel-rapl:1/max_energy_range_uj", MAX_RANGE_UJ)
    return pc


def test_rapl_package_power_from_energy_delta(tmp_path: Path) -> None:
    pc = rapl_tree(tmp_path)
    clock = FakeClock()
    source = RaplSource(tmp_path, clock=clock)
    assert source.name == "rapl:package-0" and source.measurement_point == "cpu-package"
    put(pc / "intel-rapl:0/energy_uj", 1_000_000 + 30_000_000)  # 30 J ...
    put(pc / "intel-rapl:1/energy_uj", 99_000_000)  # psys moving must not matter
    clock.t += 2.0  # ... in 2 s
    assert source.read_power_w() == pytest.approx(15.0)
    assert source.read_power_w() == pytest.approx(15.0)  # no time passed: last value, no division by 0


def test_rapl_wraparound(tmp_path: Path) -> None:
    pc = rapl_tree(tmp_path, package_uj=MAX_RANGE_UJ - 4_000_000)
    clock = FakeClock()
    source = RaplSource(tmp_path, clock=clock)
    put(pc / "intel-rapl:0/energy_uj", 6_000_000)  # wrapped: 4 J to the top, then 6 J
    clock.t += 1.0
    assert source.read_power_w() == pytest.approx(10.0)


def test_rapl_named_zones_and_absence(tmp_path: Path) -> None:
    pc = rapl_tree(tmp_path)
    clock = FakeClock()
    source = RaplSource(tmp_path, zones=["core"], clock=clock)
    put(pc / "intel-rapl:0:0/energy_uj", 500_000 + 2_500_000)
    clock.t += 0.5
    assert source.read_power_w() == pytest.approx(5.0)
    with pytest.raises(SensorUnavailableError, match="no RAPL zone dram"):
        RaplSource(tmp_path, zones=["dram"])
    with pytest.raises(SensorUnavailableError, match="no RAPL zone package-N"):
        RaplSource(tmp_path / "elsewhere")


def test_rapl_unreadable_counter_is_unavailable(tmp_path: Path) -> None:
    pc = rapl_tree(tmp_path)
    # energy_uj is root-only since CVE-2020-8694. Tests may run as root, so make the read fail
    # with an OSError another way: a directory where the file should be.
    (pc / "intel-rapl:0/energy_uj").unlink()
    (pc / "intel-rapl:0/energy_uj").mkdir()
    with pytest.raises(SensorUnavailableError, match="RAPL not readable"):
        RaplSource(tmp_path)


REAL_RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


def _real_rapl_readable() -> bool:
    try:
        int(REAL_RAPL.read_text())
        return True
    except (OSError, ValueError):
        return False


@pytest.mark.skipif(not _real_rapl_readable(), reason="no readable RAPL powercap on this machine")
def test_real_rapl_reads_a_plausible_power() -> None:
    import time

    source = RaplSource("/")
    time.sleep(0.2)
    power_w = source.read_power_w()
    assert 0.0 <= power_w < 1000.0


# ---- Jetson INA3221, JetPack 5/6 hwmon ------------------------------------------------------


def ina3221_hwmon(root: Path, device: str, hwmon: str, rails: dict[int, tuple[str, int, int]]) -> Path:
    """rails: channel -> (label, bus mV, current mA), as the mainline driver exposes them."""
    d = root / "sys/bus/i2c/drivers/ina3221" / device / "hwmon" / hwmon
    put(d / "name", "ina3221")
    for ch, (label, mv, ma) in rails.items():
        put(d / f"in{ch}_label", label)
        put(d / f"in{ch}_input", mv)
        put(d / f"curr{ch}_input", ma)
        put(d / f"curr{ch}_crit", 32760)
        put(d / f"shunt{ch}_resistor", 5000)
        put(d / f"in{ch + 3}_input", ma * 5)  # shunt voltage, µV, no label
    put(d / "in7_label", "sum of shunt voltages")  # a sum channel: must be skipped
    put(d / "in7_input", 12345)
    put(d / "curr4_input", 999)
    return d


def test_orin_uses_vdd_in_as_the_total(tmp_path: Path) -> None:
    rails = {1: ("VDD_IN", 5072, 960), 2: ("VDD_CPU_GPU_CV", 5072, 200), 3: ("VDD_SOC", 5072, 300)}
    d = ina3221_hwmon(tmp_path, "1-0040", "hwmon3", rails)  # index is not hard-coded
    source = Ina3221HwmonSource(tmp_path, ["1-0040"], "VDD_IN")
    assert source.name == "ina3221-hwmon:VDD_IN"
    assert source.read_power_w() == pytest.approx(5.072 * 0.960)
    put(d / "curr1_input", 2000)
    assert source.read_power_w() == pytest.approx(5.072 * 2.0)


def test_agx_orin_sums_rails_and_skips_nc(tmp_path: Path) -> None:
    ina3221_hwmon(
        tmp_path,
        "1-0040",
        "hwmon1",
        {1: ("VDD_GPU_SOC", 5000, 800), 2: ("VDD_CPU_CV", 5000, 600), 3: ("VIN_SYS_5V0", 5000, 400)},
    )
    ina3221_hwmon(
        tmp_path, "1-0041", "hwmon2", {1: ("NC", 5000, 900), 2: ("VDDQ_VDD2_1V8AO", 5000, 200), 3: ("NC", 1, 1)}
    )
    source = Ina3221HwmonSource(tmp_path, ["1-0040", "1-0041"], "VDD_IN", "module-rails-sum")
    assert source.name == "ina3221-hwmon:sum(VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0+VDDQ_VDD2_1V8AO)"
    assert source.read_power_w() == pytest.approx(5.0 * (0.8 + 0.6 + 0.4 + 0.2))


def test_ina3221_hwmon_skips_disabled_channels_and_reports_absence(tmp_path: Path) -> None:
    d = ina3221_hwmon(tmp_path, "7-0040", "hwmon6", {1: ("VDD_CPU", 5000, 100), 2: ("VDD_SOC", 5000, 100)})
    put(d / "in2_enable", 0)
    assert Ina3221HwmonSource(tmp_path, ["7-0040"], None).read_power_w() == pytest.approx(0.5)
    with pytest.raises(SensorUnavailableError, match="no INA3221 rails"):
        Ina3221HwmonSource(tmp_path, ["1-0040"], "VDD_IN")


# ---- Jetson INA3221, JetPack 4 iio ----------------------------------------------------------


def ina3221_iio(root: Path, device: str, rails: list[tuple[str, int]]) -> Path:
    d = root / "sys/bus/i2c/drivers/ina3221x" / device / "iio:device0"
    for ch, (name, mw) in enumerate(rails):
        put(d / f"rail_name_{ch}", name)
        put(d / f"in_power{ch}_input", mw)
        put(d / f"in_voltage{ch}_input", 5000)
        put(d / f"in_current{ch}_input", mw // 5)
    return d


def test_nano_uses_pom_5v_in(tmp_path: Path) -> None:
    d = ina3221_iio(tmp_path, "6-0040", [("POM_5V_IN", 1997), ("POM_5V_GPU", 40), ("POM_5V_CPU", 450)])
    source = Ina3221IioSource(tmp_path, ["6-0040"], "POM_5V_IN")
    assert source.name == "ina3221-iio:POM_5V_IN"
    assert source.read_power_w() == pytest.approx(1.997)
    put(d / "in_power0_input", 5200)
    assert source.read_power_w() == pytest.approx(5.2)


def test_iio_sums_when_there_is_no_total_rail(tmp_path: Path) -> None:
    ina3221_iio(tmp_path, "1-0040", [("GPU", 1000), ("SOC", 1500), ("NC", 999)])
    ina3221_iio(tmp_path, "1-0041", [("CPU", 2000), ("CV", 250)])
    source = Ina3221IioSource(tmp_path, ["1-0040", "1-0041"], "POM_5V_IN")
    assert source.read_power_w() == pytest.approx(4.75)
    with pytest.raises(SensorUnavailableError):
        Ina3221IioSource(tmp_path, ["6-0040"], "POM_5V_IN")


def test_bad_sysfs_value_is_a_read_error(tmp_path: Path) -> None:
    d = ina3221_iio(tmp_path, "6-0040", [("POM_5V_IN", 1997)])
    source = Ina3221IioSource(tmp_path, ["6-0040"], "POM_5V_IN")
    put(d / "in_power0_input", "garbage")
    with pytest.raises(PowerReadError, match="in_power0_input: expected a number, got 'garbage'"):
        source.read_power_w()


# ---- Raspberry Pi 5 PMIC ---------------------------------------------------------------------

# Real `vcgencmd pmic_read_adc` output format (Pi 5): 12 current rails, 12 voltage rails, then
# EXT5V_V and BATT_V, which have no current channel.
PMIC_OUTPUT = """\
     3V7_WL_SW_A current(0)=0.00390372A
       3V3_SYS_A current(1)=0.05562930A
       1V8_SYS_A current(2)=0.17079500A
      DDR_VDD2_A current(3)=0.02244639A
      DDR_VDDQ_A current(4)=0.00000000A
       1V1_SYS_A current(5)=0.18543010A
        0V8_SW_A current(6)=0.32109300A
      VDD_CORE_A current(7)=1.54489000A
       3V3_DAC_A current(17)=0.00048840A
       3V3_ADC_A current(18)=0.00018315A
       0V8_AON_A current(16)=0.00457875A
          HDMI_A current(22)=0.02063250A
     3V7_WL_SW_V volt(8)=3.74121000V
       3V3_SYS_V volt(9)=3.31501600V
       1V8_SYS_V volt(10)=1.79972000V
      DDR_VDD2_V volt(11)=1.11002000V
      DDR_VDDQ_V volt(12)=0.60561000V
       1V1_SYS_V volt(13)=1.10622200V
        0V8_SW_V volt(14)=0.80109860V
      VDD_CORE_V volt(15)=0.88725180V
       3V3_DAC_V volt(20)=3.30402000V
       3V3_ADC_V volt(21)=3.30768300V
       0V8_AON_V volt(19)=0.79926000V
          HDMI_V volt(23)=5.17572000V
         EXT5V_V volt(24)=5.14440000V
          BATT_V volt(25)=0.00000000V
"""


def pmic_sum_w() -> float:
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in PMIC_OUTPUT.splitlines():
        name, _, value = line.strip().partition(" ")
        number = float(value.split("=")[1][:-1])
        (amps if name.endswith("_A") else volts)[name[:-2]] = number
    return sum(amps[k] * volts[k] for k in amps)


def fake_vcgencmd(tmp_path: Path, output: str = PMIC_OUTPUT, exit_code: int = 0) -> tuple[list[str], Path]:
    """An executable that prints real-format output and counts its calls."""
    calls = tmp_path / "calls"
    (tmp_path / "out.txt").write_text(output)
    script = tmp_path / "vcgencmd"
    script.write_text(
        f'#!/bin/sh\necho "$1" >> "{calls}"\ncat "{tmp_path / "out.txt"}"\n'
        f'[ {exit_code} -eq 0 ] || echo "VCHI initialization failed" >&2\nexit {exit_code}\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return [str(script), "pmic_read_adc"], calls


def test_parse_pmic_adc_pairs_rails() -> None:
    total = parse_pmic_adc(PMIC_OUTPUT)
    assert total == pytest.approx(pmic_sum_w())
    assert 1.5 < total < 3.0  # an idle Pi 5: about 2 W on the rail sum
    with pytest.raises(PowerReadError, match="no current/voltage rail pairs"):
        parse_pmic_adc('error=1 error_msg="Command not registered"')


def test_pmic_source_calibrates_and_rate_limits(tmp_path: Path) -> None:
    command, calls = fake_vcgencmd(tmp_path)
    clock = FakeClock()
    source = PmicVcgencmdSource(command, 1.1451, 0.5879, min_interval_s=0.1, clock=clock)
    expected = 1.1451 * pmic_sum_w() + 0.5879
    assert source.read_power_w() == pytest.approx(expected)
    clock.t += 0.05  # faster than 10 Hz: the last value, no new process
    assert source.read_power_w() == pytest.approx(expected)
    assert calls.read_text().splitlines() == ["pmic_read_adc"]
    clock.t += 0.06
    source.read_power_w()
    assert len(calls.read_text().splitlines()) == 2


def test_pmic_failures(tmp_path: Path) -> None:
    command, _ = fake_vcgencmd(tmp_path, exit_code=255)
    with pytest.raises(PowerReadError, match="exited 255: VCHI initialization failed"):
        PmicVcgencmdSource(command).read_power_w()
    with pytest.raises(SensorUnavailableError, match="command not found"):
        PmicVcgencmdSource([str(tmp_path / "no-such-vcgencmd"), "pmic_read_adc"]).read_power_w()


# ---- INA2xx hwmon ----------------------------------------------------------------------------


def ina2xx_tree(root: Path, chips: dict[str, tuple[str, int]]) -> None:
    """chips: hwmonN -> (driver name, power1_input µW); `device` links to the i2c client."""
    hwmon = root / "sys/class/hwmon"
    put(hwmon / "hwmon0/name", "cpu_thermal")
    put(hwmon / "hwmon0/temp1_input", 45000)
    for index, (hw, (name, uw)) in enumerate(chips.items()):
        put(hwmon / hw / "name", name)
        put(hwmon / hw / "power1_input", uw)
        put(hwmon / hw / "in1_input", 5100)
        put(hwmon / hw / "curr1_input", uw // 5100)
        client = root / f"sys/devices/platform/soc/i2c-1/1-004{index}"
        client.mkdir(parents=True)
        os.symlink(client, hwmon / hw / "device")


def test_ina260_power_in_microwatts(tmp_path: Path) -> None:
    ina2xx_tree(tmp_path, {"hwmon2": ("ina260", 3_250_000)})
    source = Ina2xxHwmonSource(tmp_path, ["ina219", "ina260"])
    assert source.name == "ina2xx-hwmon:ina260"
    assert source.read_power_w() == pytest.approx(3.25)


def test_ina2xx_several_chips_need_i2c_device(tmp_path: Path) -> None:
    ina2xx_tree(tmp_path, {"hwmon1": ("ina219", 1_000_000), "hwmon2": ("ina226", 2_000_000)})
    with pytest.raises(SensorUnavailableError, match="set \\[sensor\\] i2c_device"):
        Ina2xxHwmonSource(tmp_path, ["ina219", "ina226"])
    assert Ina2xxHwmonSource(tmp_path, ["ina219", "ina226"], "1-0041").read_power_w() == pytest.approx(2.0)
    with pytest.raises(SensorUnavailableError, match="at 1-0045"):
        Ina2xxHwmonSource(tmp_path, ["ina219"], "1-0045")
