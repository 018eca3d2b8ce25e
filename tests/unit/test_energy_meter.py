"""Energy integration (the meter against exact integrals of known power traces, CPU-time
utilisation) and picking each board's power source; the sysfs sources are in test_energy.py."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from bench.energy_bench import READ_AT_S, meter_against_exact
from runtime.board import PowerModel, SensorConfig, load_board
from runtime.energy import (
    CpuTimeUtilisation,
    EnergyMeter,
    Ina3221HwmonSource,
    Ina3221IioSource,
    ModelSource,
    PmicVcgencmdSource,
    PowerSource,
    RaplSource,
    cgroup_cpu_time_s,
    make_power_source,
)
from tests.unit.test_energy import FakeClock, fake_vcgencmd, ina3221_hwmon, ina3221_iio, pmic_sum_w, put, rapl_tree

# ---- model, utilisation, integration --------------------------------------------------------


def test_cpu_time_utilisation_and_model_source() -> None:
    clock = FakeClock()
    cpu = {"s": 10.0}
    utilisation = CpuTimeUtilisation(lambda: cpu["s"], quota_cores=4, clock=clock)
    source = ModelSource(PowerModel(2.0, 10.0, "wall"), utilisation)
    cpu["s"] += 2.0  # 2 CPU-seconds in 1 s on a 4-core board: u = 0.5
    clock.t += 1.0
    assert source.read_power_w() == pytest.approx(6.0)
    cpu["s"] += 12.0  # more than the quota allows (host noise): clamped to u = 1
    clock.t += 1.0
    assert source.read_power_w() == pytest.approx(10.0)
    clock.t += 1.0  # idle second
    assert source.read_power_w() == pytest.approx(2.0)
    assert source.fallback_reason is None and source.measurement_point == "wall"


def test_cgroup_cpu_time_v2_and_v1(tmp_path: Path) -> None:
    put(tmp_path / "v2/cpu.stat", "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000")
    put(tmp_path / "v1/cpuacct.usage", 1_500_000_000)
    assert cgroup_cpu_time_s(tmp_path / "v2") == pytest.approx(2.5)
    assert cgroup_cpu_time_s(tmp_path / "v1") == pytest.approx(1.5)


class InstantSource(PowerSource):
    """A sensor that reports power at an instant (as INA3221 does): trapezoid rule."""

    def __init__(self) -> None:
        super().__init__("instant", "wall")

    def read_power_w(self) -> float:
        raise AssertionError("tests feed this source with add()")


def test_trapezoid_is_exact_for_linear_power_from_an_instant_sensor() -> None:
    meter = EnergyMeter(InstantSource())
    a, b = 3.0, 0.7  # P(t) = a + b t, sampled at uneven times
    times = [0.0, 0.1, 0.25, 1.0, 1.05, 2.5, 4.0]
    for t in times:
        meter.add(t, a + b * t)
    duration = times[-1]
    assert meter.energy_j == pytest.approx(a * duration + b * duration**2 / 2)
    assert meter.elapsed_s == duration and meter.n_samples == len(times)
    assert meter.mean_power_w == pytest.approx(a + b * duration / 2)


def test_trapezoid_converges_for_a_sine() -> None:
    meter = EnergyMeter(InstantSource())
    n = 1000
    for i in range(n + 1):
        t = math.pi * i / n
        meter.add(t, 5.0 + 3.0 * math.sin(t))
    exact = 5.0 * math.pi + 6.0  # ∫0^π 5 + 3 sin t dt
    assert meter.energy_j == pytest.approx(exact, rel=1e-5)


def test_model_meter_matches_the_exact_integral_of_a_known_power_trace() -> None:
    """The power model driven by CPU time (what an emulated board reports) over a known trace of
    training bursts that start and end between readings (bench/energy_bench.py), read at 1 Hz and
    at irregular extra moments; exact energy P_idle·T + (P_max − P_idle)·∫u dt."""
    exact, meter, trapezoid = meter_against_exact(PowerModel(2.0, 7.0, "wall"), READ_AT_S)
    assert abs(meter - exact) / exact < 0.005
    assert abs(trapezoid - exact) / exact > 0.02  # the old rule is off: the test tells them apart
    # Uneven readings, fewer of them: still exact, since each covers its whole interval.
    exact, meter, _ = meter_against_exact(PowerModel(1.6, 7.2, "wall"), [0.0, 0.4, 3.3, 3.4, 9.0, 16.0])
    assert abs(meter - exact) / exact < 0.005


def test_uncharged_seconds_are_left_out_of_the_integral() -> None:
    meter = EnergyMeter(ModelSource(PowerModel(1.0, 2.0, "wall"), lambda: 0.0), start_s=0.0)
    meter.add(1.0, 4.0)  # [0, 1] at 4 W: the start_s anchor opens the first interval
    meter.add(11.0, 1.0, uncharged_s=9.0)  # powered off for 9 of these 10 s
    assert meter.energy_j == pytest.approx(4.0 + 1.0)
    with pytest.raises(ValueError, match="finite"):
        meter.add(12.0, 1.0, uncharged_s=float("inf"))


def test_meter_samples_its_source_and_rejects_bad_samples() -> None:
    clock = FakeClock(0.0)
    source = ModelSource(PowerModel(2.0, 10.0, "wall"), lambda: 0.25)  # 4 W
    meter = EnergyMeter(source, clock=clock)
    for _ in range(11):
        sample = meter.sample()
        clock.t += 0.5
    assert sample.energy_j == pytest.approx(4.0 * 5.0) and sample.power_w == pytest.approx(4.0)
    assert meter.source_name == "model:2-10W"
    with pytest.raises(ValueError, match="before the previous one"):
        meter.add(1.0, 4.0)
    with pytest.raises(ValueError, match="finite"):
        meter.add(99.0, float("nan"))


def test_meter_bridges_a_failed_reading(tmp_path: Path) -> None:
    d = ina3221_iio(tmp_path, "6-0040", [("POM_5V_IN", 2000)])
    clock = FakeClock(0.0)
    meter = EnergyMeter(Ina3221IioSource(tmp_path, ["6-0040"], "POM_5V_IN"), clock=clock)
    meter.sample()
    put(d / "in_power0_input", "")  # the driver returned nothing for one read
    clock.t = 1.0
    hole = meter.sample()
    assert math.isnan(hole.power_w) and hole.energy_j == 0.0
    assert meter.read_errors == 1 and meter.last_error and "in_power0_input" in meter.last_error
    put(d / "in_power0_input", 4000)
    clock.t = 2.0
    assert meter.sample().energy_j == pytest.approx(0.5 * (2.0 + 4.0) * 2.0)  # bridged from t=0


# ---- picking a board's source ----------------------------------------------------------------


def test_make_power_source_uses_the_configured_sensor(tmp_path: Path) -> None:
    ina3221_hwmon(tmp_path, "1-0040", "hwmon1", {1: ("VDD_IN", 5000, 1000), 2: ("VDD_SOC", 5000, 100)})
    source = make_power_source(load_board("jetson-orin-nx"), tmp_path)
    assert isinstance(source, Ina3221HwmonSource) and source.fallback_reason is None
    assert source.read_power_w() == pytest.approx(5.0)

    ina3221_iio(tmp_path, "6-0040", [("POM_5V_IN", 2500)])
    assert make_power_source(load_board("jetson-nano"), tmp_path).read_power_w() == pytest.approx(2.5)

    command, _ = fake_vcgencmd(tmp_path)
    pi5 = load_board("rpi5")
    pi5 = dataclasses.replace(pi5, sensor=dataclasses.replace(pi5.sensor, command=tuple(command)))
    source = make_power_source(pi5, tmp_path)
    assert isinstance(source, PmicVcgencmdSource) and source.measurement_point == "board-5v"
    assert source.read_power_w() == pytest.approx(1.1451 * pmic_sum_w() + 0.5879)

    rapl_tree(tmp_path)
    host = dataclasses.replace(pi5, sensor=SensorConfig(kind="rapl", measurement_point="cpu-package"))
    assert isinstance(make_power_source(host, tmp_path), RaplSource)


def test_absent_sensor_falls_back_to_model_with_reason(tmp_path: Path) -> None:
    board = load_board("jetson-agx-orin")
    source = make_power_source(board, tmp_path, utilisation=lambda: 1.0)
    assert isinstance(source, ModelSource)
    assert source.fallback_reason is not None
    assert source.fallback_reason.startswith("ina3221-hwmon unavailable: no INA3221 rails under ")
    assert source.measurement_point == "module-rails-sum"
    assert source.read_power_w() == pytest.approx(board.power.p_max_w)

    pi5 = load_board("rpi5")
    missing = dataclasses.replace(pi5.sensor, command=(str(tmp_path / "vcgencmd-missing"), "pmic_read_adc"))
    source = make_power_source(dataclasses.replace(pi5, sensor=missing), tmp_path, utilisation=lambda: 0.0)
    assert source.fallback_reason is not None and "command not found" in source.fallback_reason
    assert source.read_power_w() == pytest.approx(pi5.power.p_idle_w)
    assert source.measurement_point == "wall"  # the model's point, not the sensor's


@pytest.mark.parametrize("name", ["rpi3b-plus", "rpi4b-4gb", "rpi-zero2w", "jetson-xavier-nx", "jetson-orin-nano"])
def test_every_board_gets_a_working_source_on_this_host(name: str, tmp_path: Path) -> None:
    board = load_board(name)
    source = make_power_source(board, tmp_path)
    assert isinstance(source, ModelSource)
    assert (source.fallback_reason is None) == (board.sensor.kind == "model")
    assert board.power.p_idle_w <= source.read_power_w() <= board.power.p_max_w
