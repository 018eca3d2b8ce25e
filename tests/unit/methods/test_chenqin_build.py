"""chenqin's build half: a sub-model artifact per class-subset profile (first groups at min_keep),
and the full model's relevance artifact under `@relevance`."""

from __future__ import annotations

from models.methods import method_artifacts
from runtime.manifest import read_manifest
from runtime.methods import spec
from runtime.relevance import read_relevance_manifest
from tests.unit.methods.conftest import CLASSES, INPUT_SHAPE


def test_subset_artifact_and_relevance_artifact(artifact_cache) -> None:
    params = spec("chenqin").params({"relevance_batch": 8})
    profile = "classes=0+4,width=0.25,widths=fc1:0.5"
    sets = method_artifacts("chenqin", params, "mlp", INPUT_SHAPE, CLASSES, [profile], cache_dir=artifact_cache)
    manifest = read_manifest(sets["width=0.25,classes=0+4,widths=fc1:0.5"].directory)
    assert manifest.num_outputs == 2
    assert {p.name: p.shape for p in manifest.layout}["fc1.W"] == (64, 16)  # fc1 at 0.5 of 128
    assert {p.name: p.shape for p in manifest.layout}["fc2.W"] == (16, 64)  # fc2 at 0.25 of 64
    rel = read_relevance_manifest(sets["@relevance"].directory)
    assert rel["batch"] == 8 and set(rel["probes"]) == {"fc1", "fc2"}
