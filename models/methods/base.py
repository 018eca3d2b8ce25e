"""The build step every method shares: the method's spec names the structural profiles of the
artifacts a task needs (`MethodSpec.artifact_profiles`); `artifacts_for` makes them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from models.artifacts import ArtifactSet, artifacts_for
from runtime.methods import spec


def build_structural(method: str, params: Mapping[str, Any], model: str, input_shape: tuple[int, ...],
                     num_classes: int, profiles: Iterable[str], *, optimizer: str = "sgd",
                     cache_dir: Path | None = None) -> dict[str, ArtifactSet]:
    s = spec(method)
    structural: dict[str, None] = {}
    for profile in profiles:
        structural.update(dict.fromkeys(s.artifact_profiles(s.parse_profile(profile, params), params)))
    return artifacts_for(model, input_shape, num_classes, structural, optimizer=optimizer, cache_dir=cache_dir)
