"""How the server turns an update's tensors into flat values, sparse (top-k) uploads included."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import ProtocolError
from runtime.layout import AxisGroup, ParamLayout, ParamSpec
from runtime.protocol import SparseTensor
from server.service import update_values

LAYOUT = ParamLayout(
    params=(ParamSpec("w", (2, 3), 0, (AxisGroup("a"), None)), ParamSpec("b", (2,), 6, (AxisGroup("a"),), "bias")),
    groups={"a": 2},
)
BASE = np.arange(8, dtype=np.float32)
SPARSE_W = SparseTensor(shape=(2, 3), indices=np.array([1, 5], np.int64), values=np.array([10, 50], np.float32))
DENSE_B = np.array([-1, -2], np.float32)


def test_dense_update_is_joined_as_is():
    w = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(update_values(LAYOUT, {"w": w, "b": DENSE_B}, "weights", BASE),
                                  [1, 1, 1, 1, 1, 1, -1, -2])


def test_sparse_weights_take_the_base_model_elsewhere():
    got = update_values(LAYOUT, {"w": SPARSE_W, "b": DENSE_B}, "weights", BASE)
    np.testing.assert_array_equal(got, [0, 10, 2, 3, 4, 50, -1, -2])
    np.testing.assert_array_equal(BASE, np.arange(8))  # the base model is not written to


def test_sparse_delta_is_zero_elsewhere():
    got = update_values(LAYOUT, {"w": SPARSE_W, "b": DENSE_B}, "delta", BASE)
    np.testing.assert_array_equal(got, [0, 10, 0, 0, 0, 50, -1, -2])


def test_sparse_weights_without_a_base_are_refused():
    with pytest.raises(ProtocolError, match="dev3: sparse weights need the task's base model"):
        update_values(LAYOUT, {"w": SPARSE_W, "b": DENSE_B}, "weights", None, source="dev3")
