"""The trainer section's batches and learning rate, shared by the ORT and PyTorch probes (numpy
only, so neither probe's peak RSS carries the other's imports)."""

from __future__ import annotations

from typing import Any

import numpy as np

LR = 0.01


def batches(shape: tuple[int, ...], classes: int, batch: int) -> tuple[Any, Any]:
    """8 batches of seeded normal inputs and uniform labels."""
    rng = np.random.default_rng(0)
    n = batch * 8
    return rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, classes, n).astype(np.int64)
