"""Board bundles built without a lab fixture: bad input (one ConfigError line, nothing half-written),
--force, a device named after its host, and what a FjORD device bundle prebuilds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.board import ENV_CONFIG_DIR
from runtime.device_config import load_device_config
from runtime.errors import ConfigError
from testbed.bundle import build_bundle
from tests.unit.test_bundle import BOARD, _files, _shard


def _quick(out: Path, board: str = BOARD, **kw: object) -> Path:
    args: dict[str, object] = {"device_id": None, "broker_url": "mqtt://broker:1883", "root": "orchard/x",
                               "profiles": ["dense"], "model": None, "dataset": None, "shard": None, **kw}
    return build_bundle(board, out, **args)  # type: ignore[arg-type]


def test_bundle_without_model_or_shard_names_the_device_after_its_host(tmp_path):
    tar = _quick(tmp_path)
    bundle = tmp_path / f"orchard-{BOARD}-device"
    assert tar.name == f"orchard-{BOARD}-device.tar.gz"
    files = _files(bundle)
    assert not any(f.startswith(("artifacts/", "data/")) for f in files)
    assert "ID_FROM_HOSTNAME=1" in (bundle / "install.sh").read_text()
    assert json.loads((bundle / "MANIFEST.json").read_text())["artifacts"] == {}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"board": "rpi9"}, "unknown board 'rpi9'"),
    ({"profiles": ["width=2"]}, "width"),
    ({"profiles": ["depth=3"]}, "depth"),
    ({"shard": Path("/nonexistent/shard.npz")}, "shard file not found"),
    ({"device_id": "pi 7"}, "device id"),
    ({"broker_url": "http://broker"}, "scheme"),
    ({"root": "orchard/#"}, "topic root"),
    ({"dataset": "digits"}, "dataset only matters"),
])
def test_bad_input_is_one_clear_config_error(tmp_path, kwargs, match):
    board = kwargs.pop("board", BOARD)
    with pytest.raises(ConfigError, match=match) as info:
        _quick(tmp_path, board=board, **kwargs)
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_shard_must_fit_the_model(tmp_path, artifact_cache):
    with pytest.raises(ConfigError, match="do not fit digits"):
        _quick(tmp_path / "out", model="lenet", shard=_shard(tmp_path / "s.npz", shape=(1, 4, 4)),
               cache_dir=artifact_cache)


def test_existing_output_needs_force(tmp_path):
    _quick(tmp_path)
    with pytest.raises(ConfigError, match="exists; pass --force"):
        _quick(tmp_path)
    (tmp_path / f"orchard-{BOARD}-device" / "stale.txt").write_text("old")
    _quick(tmp_path, force=True)
    assert not (tmp_path / f"orchard-{BOARD}-device" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"orchard-{BOARD}-device", f"orchard-{BOARD}-device.tar.gz"]


def test_a_fjord_device_bundle_prebuilds_only_what_its_profiles_name(tmp_path, artifact_cache, monkeypatch):
    """FjORD's artifacts depend on the campaign's widths, which the server knows: a bundle for a
    p_max device carries the profile and the slice artifacts it can name, the server the rest."""
    _quick(tmp_path, profiles=["p_max=0.5", "dense"], model="lenet", dataset="digits", cache_dir=artifact_cache)
    bundle = tmp_path / f"orchard-{BOARD}-device"
    assert list(json.loads((bundle / "MANIFEST.json").read_text())["artifacts"]) == ["dense"]
    monkeypatch.setenv(ENV_CONFIG_DIR, str(bundle / "firmware_configs"))
    assert load_device_config(bundle / "device.toml").profiles == ("p_max=0.5", "dense")
