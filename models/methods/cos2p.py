"""`cos2p`, build half: per tier (keep ρ, depth ρ_d) the three artifacts of
`Spec.artifact_profiles` (runtime/methods/cos2p.py), and the global multi-exit model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from models.artifacts import ArtifactSet, artifacts_for
from runtime.methods.cos2p import SPEC

# Scores train with AdamW: the authors' Adan is adaptive too, and the score gradients
# (∂L/∂m · σ·σ(1−σ), ~1e-3) would need a plain-SGD learning rate of ~100 (tests/unit/methods).
MASK_OPTIMIZER = "adamw"


def build(params: Mapping[str, Any], model: str, input_shape: tuple[int, ...], num_classes: int,
          profiles: Iterable[str], *, optimizer: str = "sgd", cache_dir: Path | None = None) -> dict[str, ArtifactSet]:
    p = SPEC.params(params)
    weights: dict[str, None] = {SPEC.global_profile(p): None}
    masks: dict[str, None] = {}
    for profile in profiles:
        primary, mask, sliced = SPEC.artifact_profiles(SPEC.parse_profile(profile, p), p)
        weights.update({primary: None, sliced: None})
        masks[mask] = None
    return {**artifacts_for(model, input_shape, num_classes, weights, optimizer=optimizer, cache_dir=cache_dir),
            **artifacts_for(model, input_shape, num_classes, masks, optimizer=MASK_OPTIMIZER, cache_dir=cache_dir)}
