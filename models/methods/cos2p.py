"""`cos2p`, build half: per tier (keep ρ, depth ρ_d) three artifacts (runtime/methods/cos2p.py):
the depth-d multi-exit model at full width (the task's primary layout, a prefix of the global
model), its mask-learning graph, and the sliced submodel with ⌈ρ·C⌉ units in every group the
depth-d model holds. `cos2p_structure` maps an artifact profile of the spec to its structure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from models.artifacts import ArtifactSet, ensure_artifacts
from models.structure import BLOCK_GROUPS, EXIT_BLOCKS, Structure, full_structure
from runtime.errors import ConfigError
from runtime.methods.cos2p import SPEC, depth_blocks, parse_tier
from runtime.profile import split_variant
from runtime.submodel import kept_channels


MASK_OPTIMIZER = "adamw"


def cos2p_structure(model: str, input_shape: tuple[int, ...], num_classes: int, profile: str) -> tuple[Structure, str]:
    """The structure and graph variant of a cos2p artifact profile (`keep=ρ,depth=ρ_d@variant`)."""
    structural, variant = split_variant(profile)
    if variant is None:
        raise ConfigError(f"cos2p artifact profile {profile!r} names no graph variant")
    if model not in EXIT_BLOCKS:
        raise ConfigError(f"method 'cos2p' needs a model with exit heads ({', '.join(EXIT_BLOCKS)}), got {model!r}")
    keep, depth = parse_tier(structural)
    d = depth_blocks(depth, EXIT_BLOCKS[model])
    full = full_structure(model, input_shape, num_classes)
    channels = dict(full.channels)
    for groups in BLOCK_GROUPS[model][:d]:
        for g in groups:
            channels[g] = kept_channels(keep, channels[g])
    return Structure(model, full.input_shape, channels, d), variant


def global_structure(model: str, input_shape: tuple[int, ...], num_classes: int) -> Structure:
    """The server's model: every block group and every exit head."""
    full = full_structure(model, input_shape, num_classes)
    return Structure(model, full.input_shape, full.channels, EXIT_BLOCKS[model])


def build(params: Mapping[str, Any], model: str, input_shape: tuple[int, ...], num_classes: int,
          profiles: Iterable[str], *, optimizer: str = "sgd", cache_dir: Path | None = None) -> dict[str, ArtifactSet]:
    p = SPEC.params(params)
    out: dict[str, ArtifactSet] = {}
    for profile in profiles:
        for art in SPEC.artifact_profiles(SPEC.parse_profile(profile, p), p):
            if art not in out:
                structure, variant = cos2p_structure(model, input_shape, num_classes, art)
                # Scores train with AdamW: the authors' Adan is adaptive too, and the score gradients
                # (∂L/∂m · σ·σ(1−σ)) are ~1e-3, which plain SGD would need a learning rate of ~100 for.
                opt = MASK_OPTIMIZER if variant.startswith("mask-") else optimizer
                out[art] = ensure_artifacts(structure, opt, cache_dir, variant)
    return out
