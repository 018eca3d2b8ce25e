"""ONNX graphs for MLP, LeNet-5, a VGG-style CNN and a small ResNet, at any per-group width.

Built directly with `onnx.helper` (no torch). A *group* is a set of channels that several
tensors must agree on (a conv's output channels, the next conv's input channels, a residual
stage's channels). A structure gives each group a channel count; the builder emits the graph
and a `ParamLayout` that records which axis of each parameter follows which group, so the
same code slices any submodel out of the full model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.structure import Structure
from runtime.layout import AxisGroup, FloatArray, ParamLayout, ParamSpec

OPSET = 17
IR_VERSION = 8  # ORT 1.19.2 accepts IR <= 10; onnx 1.17 would stamp 10 by default.

INPUT = "input"
LABELS = "labels"
LOGITS = "logits"


@dataclass(frozen=True)
class BuiltModel:
    model: onnx.ModelProto
    layout: ParamLayout
    flops_per_sample: int  # forward pass, 2 x multiply-accumulates of conv and dense layers
    init: FloatArray  # initial flat parameters in layout order
    flops_by_weight: Mapping[str, int] = field(default_factory=dict)  # forward FLOPs per weight tensor


@dataclass
class _Graph:
    """Accumulates nodes, initializers, layout entries and FLOPs while a model is emitted."""

    channels: Mapping[str, int]
    rng: np.random.Generator
    act_scale: Mapping[str, float] = field(default_factory=dict)  # group -> constant factor on its activations
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    specs: list[tuple[str, tuple[int, ...], tuple[AxisGroup | None, ...], str]] = field(default_factory=list)
    flops: int = 0
    flops_by_weight: dict[str, int] = field(default_factory=dict)
    counter: int = 0

    def tmp(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}_{self.counter}"

    def param(self, name: str, value: npt.NDArray[Any], axes: tuple[AxisGroup | None, ...], kind: str) -> str:
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        self.specs.append((name, tuple(value.shape), axes, kind))
        return name

    def size(self, group: str | None, fixed: int) -> int:
        return fixed if group is None else self.channels[group]

    def conv(
        self, x: str, name: str, cin: tuple[str | None, int], cout: str, hw: tuple[int, int],
        k: int = 3, stride: int = 1, relu: bool = True, bias: bool = True,
    ) -> tuple[str, tuple[int, int]]:
        """`cin` is (group or None, channel count if None); returns output name and spatial size."""
        c_in, c_out = self.size(*cin), self.channels[cout]
        pad = k // 2
        std = math.sqrt(2.0 / (c_in * k * k))
        w = self.param(
            f"{name}.W", self.rng.normal(0.0, std, (c_out, c_in, k, k)),
            (AxisGroup(cout), None if cin[0] is None else AxisGroup(cin[0]), None, None), "weight",
        )
        inputs = [x, w]
        if bias:
            inputs.append(self.param(f"{name}.b", np.zeros(c_out), (AxisGroup(cout),), "bias"))
        out = self.tmp(name)
        self.nodes.append(helper.make_node(
            "Conv", inputs, [out], kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride],
        ))
        h_out = (hw[0] + 2 * pad - k) // stride + 1
        w_out = (hw[1] + 2 * pad - k) // stride + 1
        self.flops_by_weight[w] = 2 * c_in * c_out * k * k * h_out * w_out
        self.flops += self.flops_by_weight[w]
        return (self.scaled(self.relu(out), cout) if relu else out), (h_out, w_out)

    def dense(
        self, x: str, name: str, fin: tuple[str | None, int], block: int, fout: str, relu: bool,
    ) -> str:
        """Gemm with W of shape (out, in); `block` input features per channel of the `fin` group."""
        n_in = self.size(*fin) * block
        n_out = self.channels[fout]
        std = math.sqrt((2.0 if relu else 1.0) / n_in)
        in_axis = None if fin[0] is None else AxisGroup(fin[0], block)
        w = self.param(f"{name}.W", self.rng.normal(0.0, std, (n_out, n_in)), (AxisGroup(fout), in_axis), "weight")
        b = self.param(f"{name}.b", np.zeros(n_out), (AxisGroup(fout),), "bias")
        out = self.tmp(name)
        self.nodes.append(helper.make_node("Gemm", [x, w, b], [out], transB=1))
        self.flops_by_weight[w] = 2 * n_in * n_out
        self.flops += self.flops_by_weight[w]
        return self.scaled(self.relu(out), fout) if relu else out

    def scaled(self, x: str, group: str) -> str:
        """`x` times the group's activation scale: inverted filter dropout (DISTREAL) trains a
        graph that keeps k of C channels with their activations scaled by C/k, so the next layer
        sees the full model's expected input. A graph constant, not a parameter: never trained."""
        factor = self.act_scale.get(group)
        if factor is None or factor == 1.0:
            return x
        const, out = self.tmp(f"{group}_scale"), self.tmp(f"{group}_scaled")
        self.nodes.append(helper.make_node("Constant", [], [const],
                                           value=numpy_helper.from_array(np.asarray(factor, np.float32), const)))
        self.nodes.append(helper.make_node("Mul", [x, const], [out]))
        return out

    def relu(self, x: str) -> str:
        out = self.tmp("relu")
        self.nodes.append(helper.make_node("Relu", [x], [out]))
        return out

    def maxpool(self, x: str, hw: tuple[int, int]) -> tuple[str, tuple[int, int]]:
        out = self.tmp("pool")
        self.nodes.append(helper.make_node("MaxPool", [x], [out], kernel_shape=[2, 2], strides=[2, 2]))
        return out, (hw[0] // 2, hw[1] // 2)

    def flatten(self, x: str) -> str:
        out = self.tmp("flat")
        self.nodes.append(helper.make_node("Flatten", [x], [out], axis=1))
        return out

    def op(self, op_type: str, inputs: list[str]) -> str:
        out = self.tmp(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out]))
        return out


def _mlp(g: _Graph, x: str, in_shape: tuple[int, ...]) -> str:
    h = g.flatten(x)
    h = g.dense(h, "fc1", (None, math.prod(in_shape)), 1, "fc1", relu=True)
    h = g.dense(h, "fc2", ("fc1", 0), 1, "fc2", relu=True)
    return g.dense(h, "out", ("fc2", 0), 1, "classes", relu=False)


def _lenet(g: _Graph, x: str, in_shape: tuple[int, ...]) -> str:
    # LeNet-5 (6-16-120-84) with "same" padding, so 8x8 digits and 32x32 images both fit.
    hw = (in_shape[1], in_shape[2])
    h, hw = g.conv(x, "conv1", (None, in_shape[0]), "conv1", hw, k=5)
    h, hw = g.maxpool(h, hw)
    h, hw = g.conv(h, "conv2", ("conv1", 0), "conv2", hw, k=5)
    h, hw = g.maxpool(h, hw)
    h = g.dense(g.flatten(h), "fc1", ("conv2", 0), hw[0] * hw[1], "fc1", relu=True)
    h = g.dense(h, "fc2", ("fc1", 0), 1, "fc2", relu=True)
    return g.dense(h, "out", ("fc2", 0), 1, "classes", relu=False)


def _cnn(g: _Graph, x: str, in_shape: tuple[int, ...]) -> str:
    # VGG-style: two conv-conv-pool stages and one hidden dense layer.
    hw = (in_shape[1], in_shape[2])
    h, hw = g.conv(x, "conv1", (None, in_shape[0]), "conv1", hw)
    h, hw = g.conv(h, "conv2", ("conv1", 0), "conv2", hw)
    h, hw = g.maxpool(h, hw)
    h, hw = g.conv(h, "conv3", ("conv2", 0), "conv3", hw)
    h, hw = g.conv(h, "conv4", ("conv3", 0), "conv4", hw)
    h, hw = g.maxpool(h, hw)
    h = g.dense(g.flatten(h), "fc1", ("conv4", 0), hw[0] * hw[1], "fc1", relu=True)
    return g.dense(h, "out", ("fc1", 0), 1, "classes", relu=False)


def _resnet(g: _Graph, x: str, in_shape: tuple[int, ...]) -> str:
    # Three stages of one basic block each (ResNet-8). No batch norm, whose running statistics
    # neither ORT's training graph nor federated averaging carry well; instead a learnable
    # per-channel branch scale (SkipInit, De & Smith 2020). Initialised to one, not zero: with
    # only three blocks the variance growth is harmless, and zero made SGD stall for ~200 steps.
    hw = (in_shape[1], in_shape[2])
    h, hw = g.conv(x, "stem", (None, in_shape[0]), "s1", hw)
    prev = "s1"
    for i, (stage, stride) in enumerate((("s1", 1), ("s2", 2), ("s3", 2)), start=1):
        inner = f"b{i}"
        y, hw_out = g.conv(h, f"block{i}.conv1", (prev, 0), inner, hw, stride=stride)
        y, _ = g.conv(y, f"block{i}.conv2", (inner, 0), stage, hw_out, relu=False)
        scale = g.param(f"block{i}.scale", np.ones((g.channels[stage], 1, 1)), (AxisGroup(stage), None, None), "scale")
        y = g.op("Mul", [y, scale])
        if stage != prev or stride != 1:
            skip, _ = g.conv(h, f"block{i}.proj", (prev, 0), stage, hw, k=1, stride=stride, relu=False, bias=False)
        else:
            skip = h
        h, hw, prev = g.relu(g.op("Add", [y, skip])), hw_out, stage
    pooled = g.flatten(g.op("GlobalAveragePool", [h]))
    return g.dense(pooled, "out", (prev, 0), 1, "classes", relu=False)


_BODIES: dict[str, Callable[[_Graph, str, tuple[int, ...]], str]] = {
    "mlp": _mlp,
    "lenet": _lenet,
    "cnn": _cnn,
    "resnet": _resnet,
}


def build(structure: Structure, seed: int = 0, act_scale: Mapping[str, float] | None = None) -> BuiltModel:
    """Emit the ONNX graph, layout, FLOPs and initial weights of `structure`; `act_scale` multiplies
    the activations (after ReLU) of the layers whose output channels form the named groups."""
    channels = dict(structure.channels)
    channels["classes"] = structure.num_outputs
    g = _Graph(channels=channels, rng=np.random.default_rng(seed), act_scale=dict(act_scale or {}))
    logits = _BODIES[structure.model](g, INPUT, structure.input_shape)
    g.nodes.append(helper.make_node("Identity", [logits], [LOGITS]))
    graph = helper.make_graph(
        g.nodes, f"orchard_{structure.model}",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", *structure.input_shape])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["N", structure.num_outputs])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="orchard")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    specs, offset = [], 0
    for name, shape, axes, kind in g.specs:
        specs.append(ParamSpec(name=name, shape=shape, offset=offset, axes=axes, kind=kind))
        offset += math.prod(shape)
    layout = ParamLayout(params=tuple(specs), groups=channels)
    init = np.concatenate([numpy_helper.to_array(t).reshape(-1) for t in g.inits]).astype(np.float32)
    return BuiltModel(model=model, layout=layout, flops_per_sample=g.flops, init=init,
                      flops_by_weight=dict(g.flops_by_weight))
