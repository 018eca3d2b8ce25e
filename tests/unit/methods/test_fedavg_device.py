"""fedavg's device half: it trains the primary artifact as it is, exactly like the trainer with
no method, and packs weights or a delta; its spec takes `dense` only."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import ConfigError
from runtime.methods import device_method, spec
from runtime.protocol import Assignment
from runtime.trainer import TrainConfig, Trainer
from tests.unit.methods.conftest import CLASSES, INPUT_SHAPE, Opener, mlp_layout


def test_trains_like_the_plain_trainer_and_packs_both_forms(data) -> None:
    x, y = data
    cfg = TrainConfig(steps=12, batch_size=8, lr=0.1, seed=4)
    w0 = (np.random.default_rng(1).normal(size=mlp_layout(1.0).total) * 0.2).astype(np.float32)
    opener = Opener({"k": mlp_layout(1.0)})
    method = device_method(Assignment("fedavg", "dense", ("k",)), opener)
    got = Trainer.on_backend(method.primary, INPUT_SHAPE, CLASSES).train(w0, x, y, cfg, method=method).weights
    plain = Opener({"k": mlp_layout(1.0)}).backends["k"]
    expected = Trainer.on_backend(plain, INPUT_SHAPE, CLASSES).train(w0, x, y, cfg).weights
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got - w0).max() > 1e-3
    np.testing.assert_array_equal(method.pack(w0, got, "delta").values, got - w0)
    body = method.pack(w0, got, "weights")
    assert body.form == "weights" and body.report == {}
    np.testing.assert_array_equal(body.values, got)


def test_spec_takes_dense_only() -> None:
    s = spec("fedavg")
    assert s.parse_profile("dense", {}) == "dense" and s.artifact_profiles("dense", {}) == ("dense",)
    with pytest.raises(ConfigError, match="does not take profile key 'width'"):
        s.parse_profile("width=0.5", {})
    with pytest.raises(ConfigError, match="has no key 'window'"):
        s.params({"window": "rolling"})
