"""Co-S²P's build half: per tier the primary (depth-cut, full width), mask-learning (AdamW on the
scores) and sliced artifacts, and the global multi-exit model; a depth cut's tensors are the
global's leading ones."""

from __future__ import annotations

from models.methods.cos2p import build
from runtime.manifest import read_manifest
from runtime.methods import spec

SHAPE, CLASSES = (1, 12, 12), 6


def test_tier_artifacts_and_the_global(artifact_cache) -> None:
    params = spec("cos2p").params()
    sets = build(params, "resnet", SHAPE, CLASSES, ["keep=0.5,depth=0.67", "dense"], cache_dir=artifact_cache)
    assert set(sets) == {"dense@exits-0.5-3", "depth=0.67@exits-0.5-3", "depth=0.67@mask-1",
                         "width=0.5,depth=0.67@exits-0.5-3", "dense@mask-1"}
    glob = read_manifest(sets[spec("cos2p").global_profile(params)].directory)
    cut = read_manifest(sets["depth=0.67@exits-0.5-3"].directory)
    assert glob.layout.params[:len(cut.layout.params)] == cut.layout.params
    assert {p.name for p in glob.layout} >= {"exit1.W", "exit2.W", "out.W"}
    assert cut.layout.params[-2].name == "exit2.W"  # depth 2 of 3: its last exit is exit 2
    mask = read_manifest(sets["depth=0.67@mask-1"].directory)
    assert mask.raw["optimizer"] == "adamw" and all(p.kind == "score" for p in mask.layout)
    sliced = read_manifest(sets["width=0.5,depth=0.67@exits-0.5-3"].directory)
    assert sliced.layout.total < cut.layout.total
    assert spec("cos2p").auxiliary_artifacts("dense", params) == ("dense@mask-1",)
