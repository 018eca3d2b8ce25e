"""A DISTREAL front ships in a board bundle (pareto.json plus one artifact per vector); a front
for another model, or a corrupt one, is refused with one line and no bundle is left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.errors import ConfigError
from runtime.manifest import read_manifest
from testbed.bundle import build_bundle
from tests.unit.methods.test_distreal_device import FRONT

KW = {"device_id": "pi9", "broker_url": "mqtt://10.0.0.2:1883", "root": "orchard/lab", "profiles": ["dense"],
      "dataset": "digits", "shard": None}


def test_front_and_its_vector_artifacts_are_bundled(tmp_path: Path, artifact_cache: Path) -> None:
    front = tmp_path / "front.json"
    front.write_text(json.dumps(FRONT))
    build_bundle("rpi4b-4gb", tmp_path / "dist", model="mlp", cache_dir=artifact_cache, pareto=front, **KW)
    root = tmp_path / "dist" / "orchard-rpi4b-4gb-pi9"
    assert json.loads((root / "pareto.json").read_text()) == FRONT
    groups = sorted(dict(read_manifest(d).layout.groups)["fc1"] for d in (root / "artifacts").iterdir())
    assert groups == [32, 64, 128]  # dense, fc1 at 0.5 and at 0.75 dropped


def test_bad_fronts_are_refused(tmp_path: Path, artifact_cache: Path) -> None:
    other = tmp_path / "cnn.json"
    other.write_text(json.dumps({**FRONT, "model": "cnn"}))
    with pytest.raises(ConfigError, match="is for model 'cnn', not 'mlp'"):
        build_bundle("rpi4b-4gb", tmp_path / "dist", model="mlp", cache_dir=artifact_cache, pareto=other, **KW)
    torn = tmp_path / "torn.json"
    torn.write_text('{"format": 1, "vect')
    with pytest.raises(ConfigError, match=r"torn\.json is corrupt"):
        build_bundle("rpi4b-4gb", tmp_path / "dist", model="mlp", cache_dir=artifact_cache, pareto=torn, **KW)
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())
