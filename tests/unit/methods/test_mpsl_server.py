"""mpsl's server half: FedAvg of M_1 | M_P and the assembly of the global model (numpy reference)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import RoundError
from server.methods import server_method
from server.methods.mpsl import assemble, merge_ends
from server.policies import DenseModel


def test_merge_is_sample_weighted() -> None:
    a, b = np.ones(4, np.float32), np.full(4, 4.0, np.float32)
    np.testing.assert_allclose(merge_ends([a, b], [30, 10]), (30 * a + 10 * b) / 40)
    with pytest.raises(RoundError, match="no owner sent"):
        merge_ends([], [])


def test_assemble_puts_each_part_where_it_belongs() -> None:
    full = np.arange(10, dtype=np.float32)
    spans = [[(0, 2), (8, 10)], [(2, 8)]]  # the owners' ends (M_1 then M_P), one node's middle
    parts = [np.concatenate([full[0:2], full[8:10]]), full[2:8]]
    np.testing.assert_array_equal(assemble(parts, spans, 10), full)
    with pytest.raises(RoundError, match="came from no part"):
        assemble(parts[:1], spans[:1], 10)


def test_registered_server_half() -> None:
    method = server_method("mpsl", {}, DenseModel(5))
    assignment, _ = method.assign("split", 0)
    assert assignment.method == "mpsl" and assignment.extras["batch"] == 32
