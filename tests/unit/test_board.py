"""Board configs: every shipped TOML loads and is plausible; bad files fail naming file and field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runtime.board import (
    MEASUREMENT_POINTS,
    SENSOR_KINDS,
    BoardConfig,
    PowerModel,
    configs_dir,
    list_boards,
    load_board,
)
from runtime.errors import ConfigError

EXPECTED_BOARDS = {
    "rpi3b-plus",
    "rpi4b-2gb",
    "rpi4b-4gb",
    "rpi4b-8gb",
    "rpi5",
    "rpi-zero2w",
    "jetson-nano",
    "jetson-xavier-nx",
    "jetson-orin-nano",
    "jetson-orin-nx",
    "jetson-agx-orin",
}


def test_every_board_kind_has_a_config() -> None:
    assert set(list_boards()) == EXPECTED_BOARDS


@pytest.mark.parametrize("name", sorted(EXPECTED_BOARDS))
def test_shipped_config_loads_and_is_plausible(name: str) -> None:
    board = load_board(name)
    assert isinstance(board, BoardConfig)
    assert board.name == name
    assert board.path.endswith(f"{name}.toml")
    # Speed relative to one N100 core: no board core here is faster than it, none 30x slower.
    assert 0.03 <= board.speed_factor <= 1.0
    assert board.cores in (4, 6, 8, 12)
    assert 512 <= board.ram_mb <= 65536
    # The OS takes a slice, never most of the board; what is left must hold the ORT baseline (~170 MB).
    assert 0 < board.os_reserve_mb < board.ram_mb / 2
    assert board.memory_cap_mb >= 300
    assert board.memory_cap_bytes == board.memory_cap_mb * 1024 * 1024
    # Small boards: below 10 W idle, at most 60 W module maximum (AGX Orin 64 GB), dynamic range > 1 W.
    assert 0.3 <= board.power.p_idle_w < 10
    assert board.power.p_idle_w + 1.0 < board.power.p_max_w <= 60
    assert board.power.measurement_point in MEASUREMENT_POINTS
    assert board.sensor.kind in SENSOR_KINDS
    assert board.cgroup_version in (1, 2)
    for field in ("speed_factor", "power", "cores", "ram_mb", "os_reserve_mb", "cgroup_version"):
        note = board.source(field)
        assert note and ("platform.md" in note or "est." in note), field
    speed_note = board.source("speed_factor") or ""
    assert "HPL" in speed_note or "GEMM" in speed_note  # the metric the factor rests on is named


def test_board_families_match_their_os() -> None:
    for name in EXPECTED_BOARDS:
        board = load_board(name)
        if name.startswith("rpi"):
            assert board.cgroup_version == 2 and "Bookworm" in board.os
        elif name == "jetson-nano":
            assert board.cgroup_version == 1 and "JetPack 4" in board.os
        elif name == "jetson-xavier-nx":
            assert board.cgroup_version == 1 and "JetPack 5" in board.os  # hybrid: controllers on v1
        else:
            assert board.cgroup_version == 2 and "JetPack 6" in board.os


def test_sensor_configs_match_the_hardware() -> None:
    assert load_board("jetson-nano").sensor.kind == "ina3221-iio"
    assert load_board("jetson-nano").sensor.total_rail == "POM_5V_IN"
    assert load_board("jetson-xavier-nx").sensor.i2c_devices == ("7-0040",)
    assert load_board("jetson-orin-nx").sensor.total_rail == "VDD_IN"
    agx = load_board("jetson-agx-orin")
    assert agx.sensor.i2c_devices == ("1-0040", "1-0041")
    assert agx.power.measurement_point == agx.sensor.measurement_point == "module-rails-sum"
    pi5 = load_board("rpi5").sensor
    assert pi5.kind == "pmic-vcgencmd" and pi5.min_interval_s >= 0.1
    assert (pi5.calib_scale, pi5.calib_offset_w) == (1.1451, 0.5879)
    for name in ("rpi3b-plus", "rpi4b-4gb", "rpi-zero2w"):
        sensor = load_board(name).sensor
        assert sensor.kind == "model"
        assert sensor.measurement_point == load_board(name).power.measurement_point


def test_speed_ordering_is_sane() -> None:
    s = {name: load_board(name).speed_factor for name in EXPECTED_BOARDS}
    assert s["rpi-zero2w"] < s["rpi3b-plus"] < s["rpi4b-4gb"] < s["rpi5"]
    assert s["jetson-nano"] < s["jetson-xavier-nx"] < s["jetson-orin-nano"] < s["jetson-orin-nx"]
    assert s["rpi4b-2gb"] == s["rpi4b-4gb"] == s["rpi4b-8gb"]


def test_power_model_is_linear_and_clamped() -> None:
    model = PowerModel(2.0, 10.0, "wall")
    assert model.power_w(0.0) == 2.0
    assert model.power_w(1.0) == 10.0
    assert model.power_w(0.25) == pytest.approx(4.0)
    assert model.power_w(1.7) == 10.0
    assert model.power_w(-0.2) == 2.0
    assert model.power_w(float("nan")) == 2.0


def test_load_by_path_and_override_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (configs_dir() / "rpi5.toml").read_text()
    (tmp_path / "rpi5.toml").write_text(text)
    assert load_board(tmp_path / "rpi5.toml").name == "rpi5"
    assert load_board(str(tmp_path / "rpi5.toml")).name == "rpi5"
    monkeypatch.setenv("ORCHARD_FIRMWARE_CONFIGS", str(tmp_path))
    assert list_boards() == ["rpi5"]
    assert load_board("rpi5").speed_factor == 0.68


# ---- errors name the file and the field ----------------------------------------------------

BASE = (configs_dir() / "rpi4b-4gb.toml").read_text()


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "firmware_configs").mkdir()
    return tmp_path


def _write(root: Path, text: str, name: str = "rpi4b-4gb") -> str:
    (root / "firmware_configs" / f"{name}.toml").write_text(text)
    return f"firmware_configs/{name}.toml"


def _error(root: Path, text: str, name: str = "rpi4b-4gb") -> str:
    _write(root, text, name)
    with pytest.raises(ConfigError) as info:
        load_board(name, root / "firmware_configs")
    message = str(info.value)
    assert "\n" not in message
    return message


def _swap(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def test_base_fixture_is_valid(in_tmp: Path) -> None:
    _write(in_tmp, BASE)
    assert load_board("rpi4b-4gb", in_tmp / "firmware_configs").cores == 4


def test_unknown_key_names_file_table_and_key(in_tmp: Path) -> None:
    message = _error(in_tmp, _swap("cores = 4", "cors = 4"))
    assert message.startswith("firmware_configs/rpi4b-4gb.toml: unknown key 'cors' in [board]")


def test_wrong_type_names_field_and_value(in_tmp: Path) -> None:
    message = _error(in_tmp, _swap("cores = 4", 'cores = "4"'))
    assert message == "firmware_configs/rpi4b-4gb.toml: [board] cores must be an integer, got '4' (str)"
    assert "[board] cores must be an integer, got True" in _error(in_tmp, _swap("cores = 4", "cores = true"))
    assert "[power] p_max_w must be a number" in _error(in_tmp, _swap("p_max_w = 7.2", 'p_max_w = "7.2"'))
    assert "[sensor] kind must be one of" in _error(in_tmp, _swap('kind = "model"', 'kind = "multimeter"'))


def test_missing_field_and_table(in_tmp: Path) -> None:
    message = _error(in_tmp, _swap("p_max_w = 7.2\n", ""))
    assert message == "firmware_configs/rpi4b-4gb.toml: missing key 'p_max_w' in [power]"
    no_sensor = BASE.replace("[sensor]\n", "").replace('kind = "model"\n', "")
    assert "missing table [sensor]" in _error(in_tmp, no_sensor)
    no_note = re.sub(r'^speed_factor = "platform.*\n', "", BASE, flags=re.MULTILINE)
    assert "missing key 'speed_factor' in [sources]" in _error(in_tmp, no_note)


def test_values_out_of_range(in_tmp: Path) -> None:
    assert "[power] p_max_w must be > p_idle_w (1.6), got 1.0" in _error(
        in_tmp, _swap("p_max_w = 7.2", "p_max_w = 1.0")
    )
    assert "[board] speed_factor must be in (0.0, 8.0], got 0" in _error(
        in_tmp, _swap("speed_factor = 0.24", "speed_factor = 0")
    )
    assert "[board] os_reserve_mb must be in [0, 4032], got 5000" in _error(
        in_tmp, _swap("os_reserve_mb = 512", "os_reserve_mb = 5000")
    )
    assert "[board] cgroup_version must be in [1, 2], got 3" in _error(
        in_tmp, _swap("cgroup_version = 2", "cgroup_version = 3")
    )
    assert "[power] measurement_point must be one of" in _error(
        in_tmp, _swap('measurement_point = "wall"', 'measurement_point = "socket"')
    )


def test_sensor_keys_are_checked_per_kind(in_tmp: Path) -> None:
    # A key that belongs to another sensor kind is unknown for this one.
    message = _error(in_tmp, _swap('kind = "model"', 'kind = "model"\ni2c_devices = ["1-0040"]'))
    assert "unknown key 'i2c_devices' in [sensor]" in message
    pmic = 'kind = "pmic-vcgencmd"\nmeasurement_point = "board-5v"\nmin_interval_s = 0.02'
    assert "[sensor] min_interval_s must be in [0.1, 60.0], got 0.02" in _error(in_tmp, _swap('kind = "model"', pmic))
    ina = 'kind = "ina3221-hwmon"\nmeasurement_point = "module-vdd-in"'
    assert "missing key 'i2c_devices' in [sensor]" in _error(in_tmp, _swap('kind = "model"', ina))
    bad_list = ina + '\ni2c_devices = "1-0040"'
    assert "[sensor] i2c_devices must be a list of non-empty strings" in _error(
        in_tmp, _swap('kind = "model"', bad_list)
    )


def test_structure_errors(in_tmp: Path) -> None:
    assert "unknown table 'extra'" in _error(in_tmp, BASE + "\n[extra]\nx = 1\n")
    assert "unknown top-level key 'cores'" in _error(in_tmp, "cores = 4\n" + BASE)
    assert "unknown key 'note' in [sources]" in _error(in_tmp, BASE + 'note = "x"\n')
    assert "invalid TOML" in _error(in_tmp, BASE + "[board\n")
    message = _error(in_tmp, _swap('name = "rpi4b-4gb"', 'name = "rpi5"'))
    assert "[board] name 'rpi5' does not match the file name 'rpi4b-4gb.toml'" in message


def test_unknown_board_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown board 'rpi9' \(known boards: .*rpi5.*\)"):
        load_board("rpi9")
    with pytest.raises(ConfigError, match="board config not found"):
        load_board(tmp_path / "nope.toml")
