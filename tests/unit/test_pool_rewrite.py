"""The MaxPool rewrite (models/grad_rewrite.py): the pooled values and the pool's backward
against a numpy reference that states the tie rule, and whole generated training graphs against
ORT's own MaxPool/MaxPoolGrad, gradient for gradient."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models.builder import build
from models.grad_rewrite import rewrite_max_pools, rewrite_relu_grads, rewrite_training_graph
from models.structure import full_structure
from runtime.ort import training_api, training_artifacts_module
from tests.onnx_graphs import run_graph

POOL = {"kernel_shape": [2, 2], "strides": [2, 2]}
MS = "com.microsoft"


def _pattern(relu_grad_from: str, shape: list[int | str]) -> onnx.ModelProto:
    """Relu -> MaxPool with indices -> MaxPoolGrad -> ReluGrad, as ORT's gradient builder emits it
    (its MaxPoolGrad cannot run in an inference session, the rewritten graph can)."""
    n, c, h, w = shape
    pooled = [n, c, h // 2 if isinstance(h, int) else "h", w // 2 if isinstance(w, int) else "w"]
    nodes = [helper.make_node("Relu", ["t"], ["x"]), helper.make_node("MaxPool", ["x"], ["y", "idx"], **POOL),
             helper.make_node("MaxPoolGrad", ["dy", "idx"], ["dx_pool"], **POOL),
             helper.make_node("ReluGrad", ["dx_pool", relu_grad_from], ["dt"], domain=MS)]
    graph = helper.make_graph(
        nodes, "pool", [helper.make_tensor_value_info("t", TensorProto.FLOAT, shape),
                        helper.make_tensor_value_info("dy", TensorProto.FLOAT, pooled)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, pooled),
         helper.make_tensor_value_info("dt", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    return model


def _reference(t: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rule: y is the window max of x = relu(t); the window's dy is split evenly over the
    positions whose x equals that max, then the ReLU's mask (t > 0). ORT's MaxPoolGrad gives all of
    dy to the first such position: the two differ only in windows whose maximum is positive and
    tied."""
    x = np.maximum(t, 0)
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // 2, 2, w // 2, 2)
    y = win.max(axis=(3, 5))
    hit = win == y[:, :, :, None, :, None]
    count = hit.sum(axis=(3, 5), keepdims=True).astype(np.float32)
    dx = (hit * (dy[:, :, :, None, :, None] / count)).reshape(x.shape)
    return y, np.where(t > 0, dx, np.float32(0)).astype(np.float32)


@pytest.mark.parametrize("relu_grad_from", ["t", "x"])  # ORT's ReluGrad reads the ReLU's input or output
def test_pool_backward_matches_numpy_reference_with_ties(relu_grad_from: str) -> None:
    rng = np.random.default_rng(0)
    t = rng.normal(size=(3, 4, 6, 8)).astype(np.float32)
    t[0, 0, :2, :2] = 0.7  # a window tied at a positive maximum: each of the four gets dy / 4
    t[0, 1, :2, :2] = -1.0  # a window that is all zero after the ReLU: none gets anything
    t[1, 2, 2:4, 4:6] = [[0.3, 0.3], [-2.0, 0.1]]  # two tied (dy / 2 each), one below, one cut by the ReLU
    dy = rng.normal(size=(3, 4, 3, 4)).astype(np.float32)
    model = _pattern(relu_grad_from, ["N", 4, 6, 8])
    assert rewrite_training_graph(model) == 1 + 0  # the pool; its ReluGrad is folded into it
    ops = [n.op_type for n in model.graph.node]
    assert "MaxPoolGrad" not in ops and "ReluGrad" not in ops and "MaxPool" not in ops
    onnx.checker.check_model(model)
    y, dt = run_graph(model, {"t": t, "dy": dy})
    y_ref, dt_ref = _reference(t, dy)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dt, dt_ref)
    assert (dt[0, 0, :2, :2] == dy[0, 0, 0, 0] / 4).all() and not dt[0, 1, :2, :2].any()
    assert dt[0, 0, :2, :2].sum() == pytest.approx(dy[0, 0, 0, 0])  # the window passes on dy, no more


def test_pools_it_cannot_rewrite_are_left_alone() -> None:
    odd = _pattern("t", ["N", 4, 5, 8])  # an odd height: the window grid does not tile it
    assert rewrite_max_pools(odd) == 0
    assert [n.op_type for n in odd.graph.node].count("MaxPoolGrad") == 1
    dynamic = _pattern("t", ["N", 4, "H", 8])  # no static size to reshape by
    assert rewrite_max_pools(dynamic) == 0
    # The ReLU rewrite alone still replaces the ReluGrad and keeps ORT's pool.
    assert rewrite_relu_grads(odd) == 1 and "MaxPool" in [n.op_type for n in odd.graph.node]


def _grads(directory: Path, names: list[str], x: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    module = api.Module(str(directory / "training_model.onnx"), state, str(directory / "eval_model.onnx"))
    module.train()
    module(x, labels)
    return {n: np.array(state.parameters[n].grad) for n in names}


def _ort_and_rewritten(tmp_path: Path, built: Any, rewrite: Callable[[onnx.ModelProto], int]) -> tuple[Path, Path, int]:
    """ORT's own training artifacts for `built`, and a copy whose training graph `rewrite` changed
    (with how many nodes it rewrote)."""
    art = training_artifacts_module()
    ort_dir, ours = tmp_path / "ort", tmp_path / "ours"
    ort_dir.mkdir()
    art.generate_artifacts(built.model, requires_grad=list(built.layout.names), frozen_params=[],
                           loss=art.LossType.CrossEntropyLoss, optimizer=art.OptimType.SGD,
                           artifact_directory=str(ort_dir))
    shutil.copytree(ort_dir, ours)
    training = onnx.load(str(ours / "training_model.onnx"))
    rewritten = rewrite(training)
    onnx.save(training, str(ours / "training_model.onnx"))
    return ort_dir, ours, rewritten


@pytest.mark.parametrize("model_name", ["cnn", "lenet"])
def test_generated_graph_gradients_equal_orts_own_pool(tmp_path: Path, model_name: str) -> None:
    """On float data without ties, every parameter gradient equals ORT's MaxPool/MaxPoolGrad's."""
    structure = full_structure(model_name, (3, 8, 8) if model_name == "cnn" else (1, 8, 8), 4)
    built = build(structure)
    ort_dir, ours, rewritten = _ort_and_rewritten(tmp_path, built, rewrite_max_pools)
    assert rewritten == 2
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, *structure.input_shape)).astype(np.float32)
    labels = rng.integers(0, 4, 6).astype(np.int64)
    names = list(built.layout.names)
    before, after = _grads(ort_dir, names, x, labels), _grads(ours, names, x, labels)
    for name in names:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_every_rewrite_together_keeps_the_gradients(tmp_path: Path) -> None:
    """The whole rewrite on a generated CNN graph: the pools exact, the convs' dX by a forward
    Conv in another summation order, so every gradient agrees with ORT's own graph to float32
    rounding (relative to each tensor's largest entry)."""
    structure = full_structure("cnn", (3, 16, 16), 4)  # every conv input but the first >= 1,024 floats
    built = build(structure)
    ort_dir, ours, rewritten = _ort_and_rewritten(tmp_path, built, rewrite_training_graph)
    assert rewritten == 3 + 2 + 3  # conv2-4 dX, both pools, the 3 ReLUs not before a pool
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, *structure.input_shape)).astype(np.float32)
    labels = rng.integers(0, 4, 6).astype(np.int64)
    names = list(built.layout.names)
    before, after = _grads(ort_dir, names, x, labels), _grads(ours, names, x, labels)
    for name in names:
        np.testing.assert_allclose(after[name], before[name], rtol=0, atol=1e-5 * np.abs(before[name]).max(),
                                   err_msg=name)
