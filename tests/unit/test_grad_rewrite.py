"""The ReluGrad rewrite (models/grad_rewrite.py) against ORT's own ReluGrad and a numpy reference:
the same values, bit for bit, on inputs with negatives, zeros, denormals and large values."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from models.grad_rewrite import rewrite_relu_grads
from tests.onnx_graphs import run_graph


def _relu_grad_model() -> onnx.ModelProto:
    shape = [4, 3, 5, 5]
    graph = helper.make_graph(
        [helper.make_node("ReluGrad", ["dy", "t"], ["dx"], domain="com.microsoft"),
         helper.make_node("Relu", ["t"], ["y"]),
         helper.make_node("ReluGrad", ["dy", "y"], ["dx_from_y"], domain="com.microsoft")],
        "relu_grad", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("dy", "t")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("dx", "dx_from_y")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def test_rewrite_matches_relu_grad_and_numpy() -> None:
    rng = np.random.default_rng(0)
    t = rng.normal(size=(4, 3, 5, 5)).astype(np.float32) * 10
    flat = t.reshape(-1)
    flat[:6] = [0.0, -0.0, 1e-42, -1e-42, 3e38, 0.5]  # zeros, denormals, near-max, inside (0, 1)
    dy = rng.normal(size=t.shape).astype(np.float32)
    model = _relu_grad_model()
    before = run_graph(model, {"dy": dy, "t": t})
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert rewrite_relu_grads(rewritten) == 2
    assert not [n for n in rewritten.graph.node if n.op_type == "ReluGrad"]
    onnx.checker.check_model(rewritten)
    after = run_graph(rewritten, {"dy": dy, "t": t})
    reference = np.where(t > 0, dy, np.float32(0))
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, reference)


def test_graph_without_relu_grad_is_left_alone() -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph)
    assert rewrite_relu_grads(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Relu"]
