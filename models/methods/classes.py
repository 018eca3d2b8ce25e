"""`classes`, build half: one artifact per profile, the structure of its slice."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from models.artifacts import ArtifactSet
from models.methods.base import build_structural


def build(params: Mapping[str, Any], model: str, input_shape: tuple[int, ...], num_classes: int,
          profiles: Iterable[str], *, optimizer: str = "sgd", cache_dir: Path | None = None) -> dict[str, ArtifactSet]:
    return build_structural("classes", params, model, input_shape, num_classes, profiles, optimizer=optimizer,
                            cache_dir=cache_dir)
