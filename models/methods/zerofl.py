"""`zerofl`, build half: one dense artifact (SWAT masks the weights in the buffer, not in the
graph), and the ESTIMATE of training FLOPs that ZeroFL's sparsity would save with sparse kernels.

ONNX Runtime's kernels are dense, so a masked weight costs as much as any other: the FLOPs below
are what sparse kernels would do, not what this system does (bench/zerofl_bench.py measures the
step time next to dense). Per sample and weight tensor l with forward FLOPs F_l (models/builder)
and forward density d_l (1 − s, or 1 for the dense ends): forward F_l·d_l, input gradient F_l·d_l
(the same sparse weights), weight gradient F_l (dense here: SWAT's top-k activations are not
built). Dense training is 3·Σ F_l.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from models.artifacts import ArtifactSet
from models.builder import build as build_model
from models.methods.base import build_structural
from models.structure import full_structure
from runtime.methods.zerofl import SPEC, masked_tensors


def build(params: Mapping[str, Any], model: str, input_shape: tuple[int, ...], num_classes: int,
          profiles: Iterable[str], *, optimizer: str = "sgd", cache_dir: Path | None = None) -> dict[str, ArtifactSet]:
    return build_structural("zerofl", params, model, input_shape, num_classes, profiles, optimizer=optimizer,
                            cache_dir=cache_dir)


def train_flops_per_sample(params: Mapping[str, Any] | None, model: str, input_shape: tuple[int, ...],
                           num_classes: int) -> dict[str, float]:
    """ESTIMATED training FLOPs per sample, dense and under ZeroFL's `params` (None: dense only)."""
    built = build_model(full_structure(model, input_shape, num_classes))
    flops = built.flops_by_weight
    dense = 3.0 * sum(flops.values())
    if params is None:
        return {"train_flops_dense_est": dense, "train_flops_est": dense, "ratio_est": 1.0}
    p = SPEC.params(params)
    masked = {built.layout.params[i].name for i in masked_tensors(built.layout, p["dense_ends"])}
    sparse = sum(f * (2.0 * (1.0 - p["sparsity"]) + 1.0) if name in masked else 3.0 * f
                 for name, f in flops.items())
    return {"train_flops_dense_est": dense, "train_flops_est": sparse, "ratio_est": sparse / dense}
