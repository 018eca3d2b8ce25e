"""heterofl's build half: one artifact per width; a rolling window shares the leading one's
structure, so both profiles point at the same cache entry."""

from __future__ import annotations

from models.methods import method_artifacts
from runtime.manifest import read_manifest
from tests.unit.methods.conftest import CLASSES, INPUT_SHAPE, mlp_layout


def test_one_artifact_per_structure(artifact_cache) -> None:
    sets = method_artifacts("heterofl", {"window": "leading", "average": "samples"}, "mlp", INPUT_SHAPE, CLASSES,
                            ["width=0.5", "width=0.5,window=rolling", "dense"], cache_dir=artifact_cache)
    assert set(sets) == {"width=0.5", "width=0.5,window=rolling", "dense"}
    assert sets["width=0.5"].key == sets["width=0.5,window=rolling"].key != sets["dense"].key
    assert read_manifest(sets["width=0.5"].directory).layout.total == mlp_layout(0.5).total
