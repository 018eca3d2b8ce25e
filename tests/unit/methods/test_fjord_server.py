"""FjORD's server half: a tier-p_max task gets the leading p_max slice and one artifact per
width up to p_max; its rate is p_max; nested slices average over every tier that holds them."""

from __future__ import annotations

import numpy as np

from models.builder import build
from models.structure import full_structure
from runtime.methods import spec
from server import aggregate as agg
from server.methods import server_method
from server.strategies import get_strategy
from tests.unit.methods.server_rig import LayoutModel, Rig

LAYOUT = build(full_structure("mlp", (1, 4, 4), 5)).layout
PARAMS = spec("fjord").params({"widths": [0.25, 0.5, 1.0]})


def test_assignment_lists_every_width_up_to_p_max() -> None:
    model = LayoutModel(LAYOUT)
    method = server_method("fjord", PARAMS, model)
    assignment, indices = method.assign("p_max=0.5", 2)
    assert assignment.artifact_keys == ("width=0.5", "width=0.25")
    assert assignment.extras == {"widths": [0.5, 0.25], "resample_every": 1, "distill": False}
    np.testing.assert_array_equal(indices, model.indices_for("width=0.5", 0))  # leading: no roll
    assert method.model_rate(assignment) == 0.5
    dense, full = method.assign("dense", 0)
    assert dense.artifact_keys == ("dense", "width=0.5", "width=0.25") and full is None


def test_nested_slices_average_over_their_holders() -> None:
    model = LayoutModel(LAYOUT)
    profiles = {"small": "p_max=0.25", "mid": "p_max=0.5", "big": "dense"}
    rig = Rig(get_strategy("fedavg", merge="per-element"), model, profiles, method="fjord", params=PARAMS)
    shifts = {"small": 1.0, "mid": 2.0, "big": 4.0}
    for d, shift in shifts.items():
        rig.update(d, rig.g0 + shift, n_samples=10)
    contributions = [agg.UpdateContribution(rig.task(d).indices, (rig.g0 + s)[rig.task(d).indices]
                                            if rig.task(d).indices is not None else rig.g0 + s, 10.0)
                     for d, s in shifts.items()]
    np.testing.assert_allclose(rig.engine.global_flat, agg.per_element_average(rig.g0, contributions), atol=1e-5)
    first = rig.task("small").indices[0]
    assert abs(rig.engine.global_flat[first] - (rig.g0[first] + 7.0 / 3)) < 1e-5  # held by all three
