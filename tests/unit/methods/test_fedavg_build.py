"""fedavg's build half: one real artifact, the full model's."""

from __future__ import annotations

from models.methods import method_artifacts
from runtime.manifest import read_manifest
from tests.unit.methods.conftest import CLASSES, INPUT_SHAPE, mlp_layout


def test_builds_the_full_model(artifact_cache) -> None:
    sets = method_artifacts("fedavg", {}, "mlp", INPUT_SHAPE, CLASSES, ["dense"], cache_dir=artifact_cache)
    assert list(sets) == ["dense"]
    assert read_manifest(sets["dense"].directory).layout.total == mlp_layout(1.0).total
