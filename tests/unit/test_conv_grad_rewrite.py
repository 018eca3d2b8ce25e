"""The conv input-gradient rewrite (models/grad_rewrite.py): dX by a forward Conv of dY with the
flipped, transposed weights, against a float64 numpy reference and ORT's own ConvGrad; dW and dB
stay ConvGrad's, bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models.grad_rewrite import rewrite_conv_input_grads
from tests.onnx_graphs import run_graph

MS = "com.microsoft"


def _conv_grad(shape: tuple[int, int, int, int], c_out: int, k: int, pad: int, stride: int = 1) -> onnx.ModelProto:
    _, c_in, h, w = shape
    h_out, w_out = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    attrs = {"kernel_shape": [k, k], "pads": [pad] * 4, "strides": [stride, stride]}
    graph = helper.make_graph(
        [helper.make_node("ConvGrad", ["dy", "x", "w"], ["dx", "dw", "db"], domain=MS, **attrs)], "conv_grad",
        [helper.make_tensor_value_info("dy", TensorProto.FLOAT, ["N", c_out, h_out, w_out]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, h, w]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [c_out, c_in, k, k])],
        [helper.make_tensor_value_info("dx", TensorProto.FLOAT, ["N", c_in, h, w]),
         helper.make_tensor_value_info("dw", TensorProto.FLOAT, [c_out, c_in, k, k]),
         helper.make_tensor_value_info("db", TensorProto.FLOAT, [c_out])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    return model


def _dx_reference(dy: np.ndarray, w: np.ndarray, x_shape: tuple[int, ...], pad: int) -> np.ndarray:
    """The adjoint of y[n,o,i,j] = sum_{c,a,b} x_pad[n,c,i+a,j+b] w[o,c,a,b], in float64."""
    _, _, h, wd = x_shape
    k = w.shape[2]
    dx_pad = np.zeros((x_shape[0], x_shape[1], h + 2 * pad, wd + 2 * pad))
    for a in range(k):
        for b in range(k):
            dx_pad[:, :, a:a + dy.shape[2], b:b + dy.shape[3]] += np.einsum(
                "nohw,oc->nchw", dy.astype(np.float64), w[:, :, a, b].astype(np.float64))
    return dx_pad[:, :, pad:pad + h, pad:pad + wd]


@pytest.mark.parametrize(("c_in", "c_out", "k", "pad"), [(8, 16, 3, 1), (5, 3, 5, 2), (4, 6, 3, 0)])
def test_input_gradient_matches_numpy_and_conv_grad(c_in: int, c_out: int, k: int, pad: int) -> None:
    shape = (3, c_in, 16, 12)
    model = _conv_grad(shape, c_out, k, pad)
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.normal(size=(c_out, c_in, k, k)).astype(np.float32)
    dy = rng.normal(size=(3, c_out, 16 + 2 * pad - k + 1, 12 + 2 * pad - k + 1)).astype(np.float32)
    feeds = {"dy": dy, "x": x, "w": w}
    before = run_graph(model, feeds)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert rewrite_conv_input_grads(rewritten, min_input_floats=1) == 1
    grads = [n for n in rewritten.graph.node if n.op_type == "ConvGrad"]
    assert len(grads) == 1 and grads[0].output[0] == ""
    onnx.checker.check_model(rewritten)
    dx, dw, db = run_graph(rewritten, feeds)
    reference = _dx_reference(dy, w, shape, pad)
    # float32 sums of c_out*k*k products in another order: within a few ulps of the float64 sum's
    # scale, as ConvGrad's own dX is.
    scale = np.abs(reference).max()
    np.testing.assert_allclose(dx, reference, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(before[0], reference, rtol=0, atol=2e-6 * scale)
    np.testing.assert_array_equal(dw, before[1])
    np.testing.assert_array_equal(db, before[2])


def test_convs_it_does_not_rewrite() -> None:
    strided = _conv_grad((2, 8, 16, 16), 8, 3, 1, stride=2)
    assert rewrite_conv_input_grads(strided, min_input_floats=1) == 0
    small = _conv_grad((2, 4, 8, 8), 8, 3, 1)  # 256 floats per sample: below the default threshold
    assert rewrite_conv_input_grads(small) == 0
    assert [n.op_type for n in small.graph.node] == ["ConvGrad"]
