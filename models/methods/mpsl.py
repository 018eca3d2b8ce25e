"""`mpsl`, build half: the assembled model's artifact (the aggregator scores it) and one split-part
artifact per part at the method's cuts and batch (models/split.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from models.artifacts import ArtifactSet, artifacts_for
from models.split import ensure_part_artifacts
from models.structure import full_structure
from runtime.methods import spec


def build(params: Mapping[str, Any], model: str, input_shape: tuple[int, ...], num_classes: int,
          profiles: Iterable[str], *, optimizer: str = "sgd", cache_dir: Path | None = None) -> dict[str, ArtifactSet]:
    s = spec("mpsl")
    p = s.params(params)
    for profile in profiles:
        s.parse_profile(profile, p)
    out = dict(artifacts_for(model, input_shape, num_classes, ["dense"], optimizer=optimizer, cache_dir=cache_dir))
    dirs = ensure_part_artifacts(full_structure(model, input_shape, num_classes), p["cuts"], p["batch"], cache_dir)
    for i, d in enumerate(dirs):
        out[f"split-part{i}"] = ArtifactSet(d.name, d, None)
    return out
