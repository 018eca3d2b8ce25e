"""classes' build half: the artifact has one output row per class of the subset."""

from __future__ import annotations

from models.methods import method_artifacts
from runtime.manifest import read_manifest
from tests.unit.methods.conftest import CLASSES, INPUT_SHAPE


def test_output_rows_follow_the_subset(artifact_cache) -> None:
    sets = method_artifacts("classes", {}, "mlp", INPUT_SHAPE, CLASSES, ["classes=0+4"], cache_dir=artifact_cache)
    assert read_manifest(sets["classes=0+4"].directory).num_outputs == 2
