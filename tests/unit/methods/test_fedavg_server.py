"""fedavg's server half: a dense task covers the whole model, its rate is 1, and under the
fedavg strategy the merge is the sample-weighted average (methods.md §6.1)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import ConfigError
from runtime.protocol import Assignment
from server import aggregate as agg
from server.methods import server_method
from server.policies import DenseModel, TableModel
from server.strategies import get_strategy
from tests.unit.methods.server_rig import Rig

N = 6


def test_assign_is_the_whole_model() -> None:
    method = server_method("fedavg", {}, DenseModel(N))
    assignment, indices = method.assign("dense", 3)
    assert assignment == Assignment("fedavg", "dense", ("dense",), {}) and indices is None
    assert method.model_rate(assignment) == 1.0


def test_sample_weighted_average_on_the_engine() -> None:
    rig = Rig(get_strategy("fedavg"), DenseModel(N), {"a": "dense", "b": "dense"}, method="fedavg")
    rig.update("a", rig.g0 + 1.0, n_samples=30)
    rig.update("b", rig.g0 + 4.0, n_samples=10)
    expected = agg.weighted_average(rig.g0, [agg.UpdateContribution(None, rig.g0 + 1.0, 30),
                                             agg.UpdateContribution(None, rig.g0 + 4.0, 10)])
    np.testing.assert_allclose(rig.engine.global_flat, expected, atol=1e-6)


def test_without_a_method_each_profile_goes_to_the_first_method_taking_it() -> None:
    model = TableModel(N, {"width=0.5": np.arange(3, dtype=np.int64)})
    inferred = server_method(None, None, model)
    assert inferred.assign("dense", 0)[0].method == "fedavg"
    assert inferred.assign("width=0.5", 0)[0].method == "heterofl"
    assert inferred.assign("width=0.5", 0)[0].profile == "width=0.5"
    with pytest.raises(ConfigError, match="not one of the widths"):  # fjord needs its [method] keys
        inferred.assign("p_max=0.3", 0)
