"""classes' device half: the device sees only its classes' samples, labels mapped to its rows."""

from __future__ import annotations

import numpy as np
import pytest

from models.builder import build
from models.structure import full_structure
from runtime.backend import NumpyMLP
from runtime.errors import ConfigError
from runtime.methods import device_method, spec
from runtime.protocol import Assignment
from runtime.trainer import TrainConfig, Trainer
from tests.unit.methods.conftest import INPUT_SHAPE


def test_trains_on_its_classes_only(data) -> None:
    x, y = data
    layout = build(full_structure("mlp", INPUT_SHAPE, 2)).layout  # two output rows: classes 1 and 3
    method = device_method(Assignment("classes", "classes=1+3", ("k",)), lambda key: NumpyMLP(layout))
    assert method.label_classes == (1, 3)
    r = Trainer.on_backend(method.primary, INPUT_SHAPE, 2).train(
        np.zeros(layout.total, np.float32), x, y, TrainConfig(steps=3, batch_size=8), method=method)
    assert r.n_samples == int(np.isin(y, [1, 3]).sum()) < len(y)


def test_spec_reads_classes_and_width() -> None:
    s = spec("classes")
    assert s.parse_profile("classes=0-2,width=0.5", {}) == "width=0.5,classes=0+1+2"
    with pytest.raises(ConfigError, match="is not a class index"):
        s.parse_profile("classes=a", {})
