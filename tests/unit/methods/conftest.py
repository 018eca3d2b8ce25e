"""Shared pieces for the method tests: MLP layouts at any width, numpy backends, a fake opener."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from models.builder import build
from models.structure import full_structure, sub_structure
from runtime.backend import NumpyMLP
from runtime.layout import ParamLayout
from runtime.profile import Profile
from runtime.submodel import index_map_for

INPUT_SHAPE = (1, 4, 4)
CLASSES = 5


def mlp_layout(width: float) -> ParamLayout:
    full = full_structure("mlp", INPUT_SHAPE, CLASSES)
    return build(sub_structure(full, index_map_for(Profile(width=width), full.channels))).layout


class Opener:
    """artifact key -> a numpy backend; records what was opened."""

    def __init__(self, layouts: Mapping[str, ParamLayout]) -> None:
        self.backends = {key: NumpyMLP(layout) for key, layout in layouts.items()}
        self.opened: list[str] = []

    def __call__(self, key: str) -> NumpyMLP:
        self.opened.append(key)
        return self.backends[key]


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, 48).astype(np.int64)
    x = (rng.normal(size=(48, *INPUT_SHAPE)) * 0.5 + y[:, None, None, None] / CLASSES).astype(np.float32)
    return x, y
