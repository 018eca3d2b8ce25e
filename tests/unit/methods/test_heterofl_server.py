"""heterofl's server half: leading and rolling windows, the count average next to the sample
one (methods.md §6.3), and Co-S²P's rate_i as the client's width, not its share of coordinates."""

from __future__ import annotations

import numpy as np

from models.builder import build
from models.structure import full_structure
from runtime.protocol import Update
from server import aggregate as agg
from server.events import UpdateReceived
from server.methods import server_method
from server.methods.heterofl import CountWeight
from server.policies import SampleWeight
from server.strategies import get_strategy
from tests.unit.methods.server_rig import LayoutModel, Rig

LAYOUT = build(full_structure("cnn", (1, 8, 8), 10)).layout


def test_rolling_windows_move_with_the_round_and_leading_ones_do_not() -> None:
    model = LayoutModel(LAYOUT)
    rolling = server_method("heterofl", {"window": "rolling", "average": "samples"}, model)
    a0, i0 = rolling.assign("width=0.5", 0)
    _, i1 = rolling.assign("width=0.5", 1)
    assert a0.profile == "width=0.5,window=rolling" and i0 is not None and i1 is not None
    assert not np.array_equal(i0, i1) and i0.size == i1.size
    leading = server_method("heterofl", {"window": "leading", "average": "samples"}, model)
    np.testing.assert_array_equal(leading.assign("width=0.5", 0)[1], leading.assign("width=0.5", 5)[1])


def test_count_average_is_selectable() -> None:
    model = LayoutModel(LAYOUT)
    assert isinstance(server_method("heterofl", {"average": "count"}, model).weight_policy(SampleWeight()),
                      CountWeight)
    assert isinstance(server_method("heterofl", {"average": "samples"}, model).weight_policy(SampleWeight()),
                      SampleWeight)
    profiles = {"a": "width=0.5", "b": "dense"}
    results = {}
    for average in ("count", "samples"):
        rig = Rig(get_strategy("fedavg", merge="per-element"), model, profiles, method="heterofl",
                  params={"average": average, "window": "leading"})
        rig.update("a", rig.g0 + 1.0, n_samples=30)
        rig.update("b", rig.g0 + 4.0, n_samples=10)
        results[average] = rig.engine.global_flat
        idx = rig.task("a").indices
        weights = (1.0, 1.0) if average == "count" else (30.0, 10.0)
        expected = agg.per_element_average(rig.g0, [agg.UpdateContribution(idx, (rig.g0 + 1.0)[idx], weights[0]),
                                                    agg.UpdateContribution(None, rig.g0 + 4.0, weights[1])])
        np.testing.assert_allclose(results[average], expected, atol=1e-5)
    assert not np.allclose(results["count"], results["samples"])


def test_rate_is_the_model_rate_not_the_coordinate_share() -> None:
    model = LayoutModel(LAYOUT)
    rig = Rig(get_strategy("semi-async", k=2), model, {"a": "width=0.5", "b": "dense"}, method="heterofl",
              params={"average": "samples", "window": "leading"})
    task = rig.task("a")
    assert task.indices is not None and task.indices.size / LAYOUT.total < 0.4  # conv layers shrink twice
    upd = Update(task.task_id, "a", 0, 10, 0.0, 0.0, None, "weights")
    accepted = rig.engine.check_update(UpdateReceived("a", upd, (rig.g0 + 1.0)[task.indices]))
    assert accepted.rate == 0.5
