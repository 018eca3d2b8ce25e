"""The ResNet's branch scale applied to its conv's weights and bias (models/builder.py): the same
function as scaling the conv's output, against a float64 numpy forward, and the same gradients
as ORT's for the output-scaled form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from models.builder import INPUT, LOGITS, build
from models.structure import full_structure
from runtime.ort import training_api, training_artifacts_module
from tests.onnx_graphs import run_graph


def _weights(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """The initial weights with every branch scale and bias drawn away from 1 and 0."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t).astype(np.float32)
        if t.name.endswith(".scale"):
            a = rng.uniform(0.3, 1.7, a.shape).astype(np.float32)
        elif t.name.endswith(".b"):
            a = rng.normal(0, 0.1, a.shape).astype(np.float32)
        out[t.name] = a
    return out


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int) -> np.ndarray:
    k = w.shape[2]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    h = (x.shape[2] + 2 * pad - k) // stride + 1
    wd = (x.shape[3] + 2 * pad - k) // stride + 1
    y = np.zeros((x.shape[0], w.shape[0], h, wd))
    for a in range(k):
        for c in range(k):
            patch = xp[:, :, a:a + stride * h:stride, c:c + stride * wd:stride]
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, a, c])
    return y if b is None else y + b[None, :, None, None]


def _reference(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """ResNet-8 as models/builder.py documents it: relu(scale * conv2(relu(conv1(h))) + skip)."""
    p = {k: v.astype(np.float64) for k, v in p.items()}
    h = np.maximum(_conv(x.astype(np.float64), p["stem.W"], p["stem.b"], 1), 0)
    for i, stride in ((1, 1), (2, 2), (3, 2)):
        y = np.maximum(_conv(h, p[f"block{i}.conv1.W"], p[f"block{i}.conv1.b"], stride), 0)
        y = _conv(y, p[f"block{i}.conv2.W"], p[f"block{i}.conv2.b"], 1) * p[f"block{i}.scale"][None]
        skip = _conv(h, p[f"block{i}.proj.W"], None, stride) if f"block{i}.proj.W" in p else h
        h = np.maximum(y + skip, 0)
    return h.mean(axis=(2, 3)) @ p["out.W"].T + p["out.b"]


def _with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.initializer[:]
    out.graph.initializer.extend(numpy_helper.from_array(weights[t.name], t.name) for t in model.graph.initializer)
    return out


def _output_scaled(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network with each scale multiplying its conv's output, as before the fold."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    made = {o: n for n in out.graph.node for o in n.output}
    nodes = []
    for n in out.graph.node:
        src = made.get(n.input[1]) if n.op_type == "Conv" else None
        if src is None or src.op_type != "Mul":
            nodes.append(n)
            continue
        scale = made[src.input[1]].input[0]
        conv = helper.make_node("Conv", [n.input[0], src.input[0], made[n.input[2]].input[0]], [n.output[0] + "_raw"],
                                name=n.output[0] + "_raw")
        conv.attribute.extend(n.attribute)
        nodes += [conv, helper.make_node("Mul", [n.output[0] + "_raw", scale], [n.output[0]])]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out)
    return out


def test_folded_scale_matches_numpy_forward() -> None:
    built = build(full_structure("resnet", (3, 8, 8), 10))
    graph = built.model.graph
    made = {o: n for n in graph.node for o in n.output}
    adds = [n for n in graph.node if n.op_type == "Add" and made[n.input[0]].op_type == "Conv"]
    assert len(adds) == 3  # each block's conv2 feeds its Add directly: ORT fuses Conv+Add+Relu
    weights = _weights(built.model, seed=1)
    x = np.random.default_rng(2).normal(size=(4, 3, 8, 8)).astype(np.float32)
    (logits,) = run_graph(_with_weights(built.model, weights), {INPUT: x})
    reference = _reference(weights, x)
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def _gradients(model: onnx.ModelProto, names: list[str], x: np.ndarray, y: np.ndarray, out: Path) -> dict:
    art = training_artifacts_module()
    out.mkdir()
    art.generate_artifacts(model, requires_grad=names, frozen_params=[], loss=art.LossType.CrossEntropyLoss,
                           optimizer=art.OptimType.SGD, artifact_directory=str(out),
                           additional_output_names=[LOGITS])
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(out / "checkpoint"))
    module = api.Module(str(out / "training_model.onnx"), state, str(out / "eval_model.onnx"), device="cpu")
    module.train()
    module(x, y)
    return {n: np.array(state.parameters[n].grad) for n in names}


def test_folded_scale_gradients_equal_output_scaled(tmp_path: Path) -> None:
    built = build(full_structure("resnet", (3, 8, 8), 10))
    weights = _weights(built.model, seed=3)
    names = list(built.layout.names)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=4).astype(np.int64)
    folded = _gradients(_with_weights(built.model, weights), names, x, y, tmp_path / "folded")
    scaled = _gradients(_output_scaled(_with_weights(built.model, weights)), names, x, y, tmp_path / "scaled")
    for n in names:
        # The same chain rule summed in another order: within float32 rounding of each gradient's scale.
        np.testing.assert_allclose(folded[n], scaled[n], rtol=0, atol=1e-5 * np.abs(scaled[n]).max(), err_msg=n)
