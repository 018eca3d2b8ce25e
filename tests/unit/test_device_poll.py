"""[device] poll_s and trainer_start_timeout_s: wall-time constants the testbed scales with time dilation."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.device_config import DEFAULT_POLL_S, load_device_config
from runtime.errors import ConfigError


def _write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "dev0.toml"
    path.write_text(f"""[device]
id = "dev0"
board = "rpi4b-4gb"
shard = "shard.npz"
artifact_cache = "cache"
profiles = ["dense"]
{extra}
[broker]
url = "mqtt://127.0.0.1:1883"
root = "orchard/test"
credentials = "dev0.secret.toml"
run_id = "0123456789abcdef"
""")
    return path


def test_poll_s_defaults_to_50_ms_and_takes_a_dilated_value(tmp_path: Path) -> None:
    assert load_device_config(_write(tmp_path, "")).poll_s == DEFAULT_POLL_S == 0.05
    assert load_device_config(_write(tmp_path, "poll_s = 0.6")).poll_s == 0.6


@pytest.mark.parametrize("value", ["0", "-1", "61", "\"fast\""])
def test_bad_poll_s_is_one_line_naming_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_device_config(_write(tmp_path, f"poll_s = {value}"))
    text = str(err.value)
    assert "poll_s" in text and "\n" not in text


def test_trainer_start_timeout_defaults_to_60_s_and_takes_a_dilated_value(tmp_path: Path) -> None:
    from runtime.device_config import DEFAULT_TRAINER_START_TIMEOUT_S

    assert load_device_config(_write(tmp_path, "")).trainer_start_timeout_s == DEFAULT_TRAINER_START_TIMEOUT_S == 60
    assert load_device_config(_write(tmp_path, "trainer_start_timeout_s = 2940.0")).trainer_start_timeout_s == 2940


@pytest.mark.parametrize("value", ["0", "-5", "\"slow\""])
def test_bad_trainer_start_timeout_is_one_line_naming_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_device_config(_write(tmp_path, f"trainer_start_timeout_s = {value}"))
    text = str(err.value)
    assert "trainer_start_timeout_s" in text and "\n" not in text
