"""DISTREAL's build half: the dense artifact plus one `fd` artifact per vector (the physically
smaller graph, its thinned activations scaled by C/k), cached; ServerModel accepts them as
slices of the global layout; a front for another model is refused with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.methods import method_artifacts
from runtime.errors import ConfigError
from runtime.manifest import read_manifest
from runtime.methods import spec
from server.model import ServerModel
from tests.unit.methods.conftest import CLASSES, INPUT_SHAPE
from tests.unit.methods.test_distreal_device import FRONT


def test_one_artifact_per_vector_with_inverted_dropout_scales(artifact_cache, tmp_path) -> None:
    params = spec("distreal").params({"front": FRONT})
    sets = method_artifacts("distreal", params, "mlp", INPUT_SHAPE, CLASSES, ["dense"], cache_dir=artifact_cache)
    assert set(sets) == {"dense", "drop=fc1:0.5+fc2:0.25@fd", "drop=fc1:0.75+fc2:0.75@fd"}
    half = read_manifest(sets["drop=fc1:0.5+fc2:0.25@fd"].directory)
    assert half.layout.groups["fc1"] == 64 and half.layout.groups["fc2"] == 48
    assert half.raw["act_scale"] == {"fc1": 2.0, "fc2": 64 / 48}
    assert "act_scale" not in read_manifest(sets["dense"].directory).raw
    again = method_artifacts("distreal", params, "mlp", INPUT_SHAPE, CLASSES, ["dense"], cache_dir=artifact_cache)
    assert {k: v.key for k, v in again.items()} == {k: v.key for k, v in sets.items()}  # cached
    np.save(tmp_path / "init.npy", np.zeros(read_manifest(sets["dense"].directory).layout.total, np.float32))
    (tmp_path / "artifacts.json").write_text(json.dumps({
        "model": "mlp", "init": "init.npy", "global": str(sets["dense"].directory),
        "profiles": {k: str(v.directory) for k, v in sets.items()}}))
    model = ServerModel(tmp_path / "artifacts.json")  # checks each artifact is its profile's slice
    assert model.artifact_key("drop=fc1:0.75+fc2:0.75@fd") == sets["drop=fc1:0.75+fc2:0.75@fd"].key


def test_a_front_for_another_model_is_refused(artifact_cache) -> None:
    params = spec("distreal").params({"front": {**FRONT, "model": "cnn"}})
    with pytest.raises(ConfigError, match="Pareto front is for model 'cnn', not 'mlp'"):
        method_artifacts("distreal", params, "mlp", INPUT_SHAPE, CLASSES, ["dense"], cache_dir=artifact_cache)
    params = spec("distreal").params({"front": {**FRONT, "groups": {"fc1": 100, "fc2": 64}}})
    with pytest.raises(ConfigError, match="group 'fc1' has 100 channels; model 'mlp' has 128"):
        method_artifacts("distreal", params, "mlp", INPUT_SHAPE, CLASSES, ["dense"], cache_dir=artifact_cache)
    params = spec("distreal").params({"front": {**FRONT, "num_classes": 10}})
    with pytest.raises(ConfigError, match="num_classes 10 does not match the campaign's 5"):
        method_artifacts("distreal", params, "mlp", INPUT_SHAPE, CLASSES, ["dense"], cache_dir=artifact_cache)
