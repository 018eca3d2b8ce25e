"""`chenqin`, build half: one artifact per class-subset profile (the structure of its slice), and
the relevance artifact of the full model (models/relevance.py) under the name `@relevance`,
which the campaign lists in artifacts.json's `extra` for the server half."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from models.artifacts import ArtifactSet
from models.methods.base import build_structural
from models.relevance import ensure_relevance_artifact, relevance_key
from models.structure import full_structure

RELEVANCE = "@relevance"


def build(params: Mapping[str, Any], model: str, input_shape: tuple[int, ...], num_classes: int,
          profiles: Iterable[str], *, optimizer: str = "sgd", cache_dir: Path | None = None) -> dict[str, ArtifactSet]:
    out = build_structural("chenqin", params, model, input_shape, num_classes, profiles, optimizer=optimizer,
                           cache_dir=cache_dir)
    full = full_structure(model, tuple(input_shape), num_classes)
    batch = int(params.get("relevance_batch", 64))
    directory = ensure_relevance_artifact(full, batch, cache_dir)
    out[RELEVANCE] = ArtifactSet(relevance_key(full, batch), directory, None)
    return out
