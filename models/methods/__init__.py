"""Build halves of the methods: which artifacts each needs (host only; see runtime/methods).

`method_artifacts(name, params, profiles, ...)` returns the artifact set of every structural
profile the method's tasks under `profiles` use, via `models.artifacts.artifacts_for`.
`name=None`: per profile, the first method that accepts it (a campaign without [method]).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from models.artifacts import ArtifactSet
from runtime.methods import half, infer_method, spec


def method_artifacts(name: str | None, params: Mapping[str, Any], model: str, input_shape: tuple[int, ...],
                     num_classes: int, profiles: Iterable[str], *, optimizer: str = "sgd",
                     cache_dir: Path | None = None) -> dict[str, ArtifactSet]:
    out: dict[str, ArtifactSet] = {}
    for profile in profiles:
        method = name or infer_method(profile)
        method_params = params if name else spec(method).params()  # a legacy profile: the defaults
        built: dict[str, ArtifactSet] = half(method, "build").build(
            method_params, model, input_shape, num_classes, [profile], optimizer=optimizer, cache_dir=cache_dir)
        out.update(built)
    return out
