"""DISTREAL's server half: every device gets the full dense model and every vector's artifact,
whatever it will pick; its full dense update is merged by plain FedAvg, and under
fedavg-deadline a device that misses the deadline is dropped from the round."""

from __future__ import annotations

import numpy as np

from models.builder import build
from models.structure import full_structure
from runtime.methods import spec
from runtime.profile import split_variant
from server.events import Tick
from server.methods import server_method
from server.strategies import get_strategy
from tests.unit.methods.server_rig import LayoutModel, Rig
from tests.unit.methods.test_distreal_device import FRONT

LAYOUT = build(full_structure("mlp", (1, 4, 4), 5)).layout
PARAMS = spec("distreal").params({"front": FRONT})


class VariantModel(LayoutModel):
    def artifact_key(self, profile: str) -> str:
        structural, variant = split_variant(profile)
        return super().artifact_key(structural) + (f"@{variant}" if variant else "")


def test_assignment_is_the_full_model_with_every_vector() -> None:
    method = server_method("distreal", PARAMS, VariantModel(LAYOUT))
    assignment, indices = method.assign("dense", 3)
    assert indices is None  # the full dense model goes down and comes back
    assert assignment.artifact_keys == ("dense", "drop=fc1:0.5+fc2:0.25@fd", "drop=fc1:0.75+fc2:0.75@fd")
    assert [v["artifact"] for v in assignment.extras["vectors"]] == [0, 1, 2]
    assert assignment.extras["select"] is True and method.model_rate(assignment) == 1.0
    assert method.smaller("dense", ("dense",)) == []


def test_uniform_rate_is_one_fixed_vector() -> None:
    p = spec("distreal").params({"front": FRONT, "uniform_rate": 0.5})
    assignment, _ = server_method("distreal", p, VariantModel(LAYOUT)).assign("dense", 0)
    assert assignment.artifact_keys == ("dense", "drop=fc1:0.5+fc2:0.5@fd")
    assert assignment.extras["select"] is False and len(assignment.extras["vectors"]) == 1


def test_fedavg_of_full_models_and_stragglers_dropped_at_the_deadline() -> None:
    model = VariantModel(LAYOUT)
    profiles = {"a": "dense", "b": "dense", "late": "dense"}
    rig = Rig(get_strategy("fedavg-deadline", deadline_s=5.0), model, profiles, method="distreal", params=PARAMS)
    rig.update("a", rig.g0 + 1.0, n_samples=10)
    rig.update("b", rig.g0 + 4.0, n_samples=30)
    assert rig.logs("aggregated") == []  # still waiting for the third
    rig.actions += rig.engine.handle(Tick(now=10.0))
    expected = rig.g0 + (1.0 * 10 + 4.0 * 30) / 40  # sample-weighted, the straggler not in it
    np.testing.assert_allclose(rig.engine.global_flat, expected, atol=1e-5)
