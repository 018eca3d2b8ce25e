"""A campaign's [method] table: each method is selectable with its keys, the method's defaults
reach the strategy unless [strategy] says otherwise, and every bad value is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.errors import ConfigError
from server.config import load_server_config
from testbed.campaign import load_campaign

FLEET = '[[fleet]]\nname = "a"\nboard = "rpi4b-4gb"\nprofiles = {profiles}\n'


def write(tmp_path: Path, method: str, strategy: str, profiles: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[campaign]\nname = "c"\n{method}\n{strategy}\n' + FLEET.format(profiles=profiles))
    return path


@pytest.mark.parametrize(("method", "profiles", "expected"), [
    ('[method]\nname = "fedavg"', '["dense"]', ("dense",)),
    ('[method]\nname = "heterofl"', '["width=0.5", "width=0.25"]', ("width=0.5", "width=0.25")),
    ('[method]\nname = "heterofl"\nwindow = "rolling"', '["width=0.5"]', ("width=0.5,window=rolling",)),
    ('[method]\nname = "fjord"\nwidths = [0.25, 0.5, 1.0]', '["p_max=0.5", "dense"]', ("p_max=0.5", "dense")),
    ('[method]\nname = "classes"', '["classes=0-2"]', ("classes=0+1+2",)),
])
def test_each_method_is_selectable(tmp_path: Path, method: str, profiles: str, expected: tuple[str, ...]) -> None:
    c = load_campaign(write(tmp_path, method, '[strategy]\nname = "fedavg"', profiles))
    assert c.method == method.split('"')[1] and c.fleet[0].profiles == expected


def test_method_defaults_reach_the_strategy_and_strategy_wins(tmp_path: Path) -> None:
    c = load_campaign(write(tmp_path, '[method]\nname = "heterofl"', '[strategy]\nname = "fedavg"', '["width=0.5"]'))
    assert c.strategy_params == {"merge": "per-element"}
    c = load_campaign(write(tmp_path, '[method]\nname = "heterofl"', '[strategy]\nname = "fedavg"\nmerge = "dense"',
                            '["dense"]'))
    assert c.strategy_params == {"merge": "dense"}
    c = load_campaign(write(tmp_path, '[method]\nname = "fjord"', '[strategy]\nname = "fedbuff"', '["dense"]'))
    assert c.strategy_params == {}  # fedbuff has no merge key: the default does not apply
    legacy = load_campaign(write(tmp_path, "", '[strategy]\nname = "fedavg"', '["width=0.5"]'))
    assert legacy.method is None and legacy.strategy_params == {}  # no [method]: exactly as before


@pytest.mark.parametrize(("method", "profiles", "match"), [
    ('[method]\nname = "no-such-method"', '["dense"]', "unknown method 'no-such-method'"),
    ('[method]\nwindow = "rolling"', '["dense"]', r"\[method\] needs name"),
    ('[method]\nname = "heterofl"\nwidth = 0.5', '["dense"]', "has no key 'width'"),
    ('[method]\nname = "fjord"', '["width=0.5"]', "takes profiles 'p_max=<width>'"),
    ('[method]\nname = "fjord"\nwidths = [0.5, 1.0]', '["p_max=0.25"]', "not one of the widths"),
    ('[method]\nname = "fedavg"', '["width=0.5"]', "does not take profile key 'width'"),
])
def test_bad_method_tables_name_the_problem(tmp_path: Path, method: str, profiles: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_campaign(write(tmp_path, method, '[strategy]\nname = "fedavg"', profiles))


def test_server_config_reads_the_method(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('[server]\nroot = "r"\nartifacts = "a.json"\neval_data = "e.npz"\n'
                    'credentials = "s.toml"\nrun_id = "r1"\n'
                    '[method]\nname = "fjord"\nwidths = [0.5, 1.0]\n[assign]\ndevices = { d = "p_max=0.5" }\n')
    cfg = load_server_config(path)
    assert cfg.method == "fjord" and cfg.method_params["widths"] == [0.5, 1.0]
    assert cfg.method_params["resample_every"] == 1 and cfg.method_params["distill"] is False
    assert cfg.device_profiles == {"d": "p_max=0.5"}
