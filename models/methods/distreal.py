"""`distreal`, build half: the dense artifact plus one per vector on the front, each the
physically smaller graph of that vector with inverted-dropout scaling (variant `fd`), generated
ahead of time and cached by structure like every other artifact. A front made for another model
(or input, or class count) is refused here, before anything is built."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from models.artifacts import ArtifactSet
from models.methods.base import build_structural
from models.structure import BASE_CHANNELS
from runtime.errors import ConfigError
from runtime.methods.distreal import SPEC


def check_front_fits(front: Mapping[str, Any], model: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    """ConfigError naming the mismatch when a Pareto front was not made for this model."""
    if front["model"] != model:
        raise ConfigError(f"Pareto front is for model {front['model']!r}, not {model!r}")
    base = BASE_CHANNELS[model]
    for g, n in front["groups"].items():
        if base.get(g) != n:
            raise ConfigError(f"Pareto front group {g!r} has {n} channels; model {model!r} has {base.get(g)}")
    for key, mine in (("input_shape", list(input_shape)), ("num_classes", num_classes)):
        if key in front and front[key] != mine:
            raise ConfigError(f"Pareto front {key} {front[key]!r} does not match the campaign's {mine!r}")


def build(params: Mapping[str, Any], model: str, input_shape: tuple[int, ...], num_classes: int,
          profiles: Iterable[str], *, optimizer: str = "sgd", cache_dir: Path | None = None) -> dict[str, ArtifactSet]:
    SPEC.vectors(params)  # a one-line error when there is no front
    check_front_fits(params["front"], model, input_shape, num_classes)
    return build_structural("distreal", params, model, input_shape, num_classes, profiles, optimizer=optimizer,
                            cache_dir=cache_dir)
