"""chenqin's device half and spec: the device trains its slice on its classes' samples with
local labels; the campaign fills in classes from the labels (or checks declared ones), the
balancer covers every class twice, and min_keep widens the first two groups."""

from __future__ import annotations

import numpy as np
import pytest

from models.builder import build
from models.structure import full_structure
from runtime.backend import NumpyMLP
from runtime.errors import ConfigError
from runtime.methods import device_method, spec
from runtime.methods.chenqin import balance_classes, classes_from_histogram
from runtime.protocol import Assignment
from runtime.trainer import TrainConfig, Trainer
from tests.unit.methods.conftest import INPUT_SHAPE

GROUPS = {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84, "classes": 4}


def test_trains_its_classes_with_local_labels(data) -> None:
    x, y = data
    layout = build(full_structure("mlp", INPUT_SHAPE, 2)).layout
    method = device_method(Assignment("chenqin", "width=0.5,classes=1+3", ("k",)), lambda key: NumpyMLP(layout))
    assert method.label_classes == (1, 3)
    r = Trainer.on_backend(method.primary, INPUT_SHAPE, 2).train(
        np.zeros(layout.total, np.float32), x, y, TrainConfig(steps=3, batch_size=8), method=method)
    assert r.n_samples == int(np.isin(y, [1, 3]).sum()) < len(y)


def test_fleet_profiles_take_classes_from_labels_and_keep_the_first_groups() -> None:
    s = spec("chenqin")
    params = s.params({"min_share": 0.2, "min_keep": 0.5})
    hists = [[50, 40, 10, 0], [0, 0, 30, 30]]
    out = s.fleet_profiles(params, ["width=0.25", "classes=3,width=0.75"], hists, GROUPS)
    # device 0: class 2 holds 10% < 20%; conv1/conv2 widened to 0.5; device 1 is wider than min_keep
    assert out == ["width=0.25,classes=0+1,widths=conv1:0.5+conv2:0.5", "width=0.75,classes=3"]
    assert s.parse_profile(out[0], params) == out[0]


def test_declared_classes_without_data_or_out_of_range_are_one_line() -> None:
    s = spec("chenqin")
    params = s.params()
    with pytest.raises(ConfigError, match="device 1: declares class 2 but holds no sample of it"):
        s.fleet_profiles(params, ["width=0.5", "classes=2+3,width=0.5"], [[5, 5, 0, 0], [1, 0, 0, 9]], GROUPS)
    with pytest.raises(ConfigError, match="device 0: class 6 is out of range for a model of 4 classes"):
        s.fleet_profiles(params, ["classes=0+6,width=0.5"], [[5, 5, 0, 0]], GROUPS)


def test_classes_from_histogram_threshold() -> None:
    assert classes_from_histogram([50, 5, 45], 0.1) == (0, 2)
    with pytest.raises(ConfigError, match="holds no samples"):
        classes_from_histogram([0, 0], 0.1)


def test_balancer_covers_each_class_twice_and_loads_the_lightest() -> None:
    hists = np.array([[100, 5, 5, 0], [5, 100, 0, 5], [0, 5, 100, 5], [5, 0, 5, 100]])
    costs = [1.0, 1.0, 0.25, 0.25]  # devices 2 and 3 run a quarter of the FLOPs per sample
    out = balance_classes(hists, costs, min_cover=2, min_share=0.5)
    for c in range(4):
        assert sum(c in s for s in out) >= 2
    assert all(set(s) >= {d} for d, s in enumerate(out))  # each keeps its own main class
    # class 0 is held (besides device 0) by devices 1 and 3; device 3 is lighter, so it gets it
    assert 0 in out[3] and 0 not in out[1]


def test_spec_rejects_what_it_does_not_take() -> None:
    s = spec("chenqin")
    with pytest.raises(ConfigError, match="does not take profile key 'window'"):
        s.parse_profile("width=0.5,window=rolling", {})
    with pytest.raises(ConfigError, match="names no classes"):
        s.artifact_profiles("width=0.5", s.params())
    with pytest.raises(ConfigError, match="min_keep 2 must be a number in"):
        s.params({"min_keep": 2})
