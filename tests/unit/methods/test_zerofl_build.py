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


def test_the_shipped_compare_zerofl_sweep_is_the_full_grid() -> None:
    from pathlib import Path

    from testbed.sweep import load_sweep, variant_tables

    plan = load_sweep(Path(__file__).resolve().parents[3] / "campaigns" / "compare-zerofl.toml")
    assert plan.seeds == (0, 1, 2) and plan.base["model"]["partition"] == "dirichlet:1.0"
    assert plan.base["model"]["dataset"] == "fashion-mnist" and sum(g["count"] for g in plan.base["fleet"]) >= 8
    methods = {v.name: variant_tables(plan, v, 0)["method"] for v in plan.variants}
    grid = {(m["sparsity"], m.get("mask_ratio", 0.0), m["upload"]) for m in methods.values() if m["name"] == "zerofl"}
    uploads = ("top-k-weights", "diff-top-k-weights", "top-k-diff")
    assert grid == {(s, r, u) for s in (0.9, 0.95) for r in (0.0, 0.1, 0.2) for u in uploads} | {
        (0.9, 0.0, "dense"), (0.95, 0.0, "dense")}
    assert methods["fedavg"] == {"name": "fedavg"}
    assert all("." not in name for name in methods)  # a run id becomes a cgroup name, which may not hold one
