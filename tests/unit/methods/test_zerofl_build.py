"""ZeroFL's build half: one dense artifact (the mask lives in the buffer, not the graph), and a
training-FLOPs ESTIMATE that follows the formula in models/methods/zerofl.py."""

from __future__ import annotations

import pytest

from models.builder import build as build_model
from models.methods import method_artifacts
from models.methods.zerofl import train_flops_per_sample
from models.structure import full_structure
from runtime.manifest import read_manifest
from runtime.methods import spec
from tests.unit.methods.conftest import CLASSES, INPUT_SHAPE


def test_one_dense_artifact(artifact_cache) -> None:
    params = spec("zerofl").params({"sparsity": 0.95})
    sets = method_artifacts("zerofl", params, "mlp", INPUT_SHAPE, CLASSES, ["dense"], cache_dir=artifact_cache)
    assert set(sets) == {"dense"}
    assert read_manifest(sets["dense"].directory).layout.total == build_model(
        full_structure("mlp", INPUT_SHAPE, CLASSES)).layout.total


def test_flops_estimate_by_layer() -> None:
    built = build_model(full_structure("lenet", (1, 28, 28), 10))
    f = built.flops_by_weight
    assert sum(f.values()) == built.flops_per_sample and set(f) == {"conv1.W", "conv2.W", "fc1.W", "fc2.W", "out.W"}
    est = train_flops_per_sample({"sparsity": 0.9}, "lenet", (1, 28, 28), 10)
    inner = f["conv2.W"] + f["fc1.W"] + f["fc2.W"]  # dense_ends keeps conv1 and the classifier dense
    assert est["train_flops_dense_est"] == 3 * built.flops_per_sample
    assert est["train_flops_est"] == pytest.approx(3 * (f["conv1.W"] + f["out.W"]) + inner * (2 * 0.1 + 1))
    all_masked = train_flops_per_sample({"sparsity": 0.9, "dense_ends": False}, "lenet", (1, 28, 28), 10)
    assert all_masked["ratio_est"] == pytest.approx((2 * 0.1 + 1) / 3)
    assert train_flops_per_sample(None, "lenet", (1, 28, 28), 10)["ratio_est"] == 1.0
