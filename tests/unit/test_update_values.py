"""How the server turns an update's tensors into coordinates and values: dense ones bring all
their coordinates, sparse (top-k, masked) ones only what was sent; nothing is densified."""

from __future__ import annotations

import numpy as np

from runtime.layout import AxisGroup, ParamLayout, ParamSpec
from runtime.protocol import SparseTensor
from server.service import update_body

LAYOUT = ParamLayout(
    params=(ParamSpec("w", (2, 3), 0, (AxisGroup("a"), None)), ParamSpec("b", (2,), 6, (AxisGroup("a"),), "bias")),
    groups={"a": 2},
)
SPARSE_W = SparseTensor(shape=(2, 3), indices=np.array([1, 5], np.int64), values=np.array([10, 50], np.float32))
DENSE_B = np.array([-1, -2], np.float32)


def test_dense_update_is_joined_as_is():
    w = np.ones((2, 3), np.float32)
    indices, values = update_body(LAYOUT, {"w": w, "b": DENSE_B})
    assert indices is None
    np.testing.assert_array_equal(values, [1, 1, 1, 1, 1, 1, -1, -2])


def test_sparse_tensors_bring_only_the_coordinates_sent():
    indices, values = update_body(LAYOUT, {"w": SPARSE_W, "b": DENSE_B})
    assert indices is not None
    np.testing.assert_array_equal(indices, [1, 5, 6, 7])
    np.testing.assert_array_equal(values, [10, 50, -1, -2])


def test_an_all_sparse_update_offsets_each_tensor():
    b = SparseTensor(shape=(2,), indices=np.array([1], np.int64), values=np.array([7], np.float32))
    indices, values = update_body(LAYOUT, {"w": SPARSE_W, "b": b})
    assert indices is not None
    np.testing.assert_array_equal(indices, [1, 5, 7])
    np.testing.assert_array_equal(values, [10, 50, 7])


def test_a_device_body_travels_as_sent_and_comes_back_the_same() -> None:
    """A method's UpdateBody with indices (a top-k upload) -> sparse tensors -> frame -> the
    server's coordinates and values: exactly the ones sent, a tensor with none sent included."""
    from runtime.frames import decode_update, encode_update
    from runtime.methods.base import UpdateBody
    from runtime.protocol import Update

    body = UpdateBody("delta", np.array([0.5, -1.5, 2.0], np.float32), {"k": 3.0}, np.array([1, 4, 5], np.int64))
    tensors = body.tensors(LAYOUT)
    assert isinstance(tensors["b"], SparseTensor) and tensors["b"].indices.size == 0
    upd = Update("t1", "d", 0, 1, 0.0, 0.0, None, body.form, tensors=tensors, report=body.report)
    back = decode_update(encode_update(upd))
    indices, values = update_body(LAYOUT, back.tensors)
    np.testing.assert_array_equal(indices, [1, 4, 5])
    np.testing.assert_array_equal(values, [0.5, -1.5, 2.0])
    assert back.report == {"k": 3.0}
    dense = UpdateBody("weights", np.arange(8, dtype=np.float32)).tensors(LAYOUT)
    assert update_body(LAYOUT, dense)[0] is None
