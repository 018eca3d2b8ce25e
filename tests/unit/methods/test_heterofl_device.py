"""heterofl's device half and spec: the device trains the slice it was sent; the spec reads
width and window, takes the default window from [method], and checks its keys."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import ConfigError
from runtime.methods import device_method, infer_method, spec
from runtime.protocol import Assignment
from runtime.trainer import TrainConfig, Trainer
from tests.unit.methods.conftest import CLASSES, INPUT_SHAPE, Opener, mlp_layout


def test_trains_the_slice_it_was_sent(data) -> None:
    x, y = data
    opener = Opener({"half": mlp_layout(0.5)})
    method = device_method(Assignment("heterofl", "width=0.5,window=rolling", ("half",)), opener)
    w0 = np.zeros(mlp_layout(0.5).total, np.float32) + 0.01
    r = Trainer.on_backend(method.primary, INPUT_SHAPE, CLASSES).train(w0, x, y, TrainConfig(steps=5, batch_size=8),
                                                                      method=method)
    assert r.weights.size == mlp_layout(0.5).total and r.n_samples == len(y)


def test_spec_window_default_and_keys() -> None:
    s = spec("heterofl")
    rolling = s.params({"window": "rolling", "average": "count"})
    assert s.parse_profile("width=0.5", rolling) == "width=0.5,window=rolling"
    assert s.parse_profile("width=0.5,window=leading", rolling) == "width=0.5"  # the profile's own word wins
    assert s.parse_profile("width=0.5", s.params()) == "width=0.5"
    for table, match in (({"window": "sideways"}, "window 'sideways'"), ({"average": "median"}, "average 'median'")):
        with pytest.raises(ConfigError, match=match):
            s.params(table)
    with pytest.raises(ConfigError, match="does not take profile key 'classes'"):
        s.parse_profile("classes=0-4", s.params())


def test_legacy_profiles_find_their_method() -> None:
    assert [infer_method(p) for p in ("dense", "width=0.5", "width=0.25,window=rolling", "classes=0-4",
                                      "classes=1+2,width=0.5", "p_max=0.4")] == [
        "fedavg", "heterofl", "heterofl", "classes", "classes", "fjord"]
