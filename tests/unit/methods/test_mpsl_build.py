"""mpsl's build half: the assembled model's artifact and one artifact per split part."""

from __future__ import annotations

from models.methods import method_artifacts
from runtime.manifest import read_manifest
from runtime.methods import spec


def test_parts_and_the_whole(artifact_cache) -> None:
    params = spec("mpsl").params({"cuts": ["conv1", "conv3", "fc1"], "batch": 4})
    sets = method_artifacts("mpsl", params, "cnn", (1, 12, 12), 10, ["split"], cache_dir=artifact_cache)
    assert set(sets) == {"dense", "split-part0", "split-part1", "split-part2", "split-part3"}
    whole = read_manifest(sets["dense"].directory).layout.total
    weights = [read_manifest(sets[f"split-part{i}"].directory).raw["split"]["weights"] for i in range(4)]
    assert sum(weights) == whole
