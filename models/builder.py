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
from runtime.backend import EXIT_PREFIX
from runtime.errors import ConfigError
from runtime.layout import AxisGroup, FloatArray, ParamLayout, ParamSpec

OPSET = 17
IR_VERSION = 8  # ORT 1.19.2 accepts IR <= 10; onnx 1.17 would stamp 10 by default.

INPUT = "input"
LABELS = "labels"
LOGITS = "logits"
# Multi-exit models (Co-S²P): `logits` is the deepest exit the model holds, `exit<i>` a shallower
# one. The mask-learning graph adds, per prunable group g, a trainable score `mask.<g>`, the
# host-drawn Bernoulli sample `mask_sample.<g>` and `score_ref.<g>` (the scores' current value,
# fed back so the straight-through term below needs no stop-gradient op), and the output
# `mask_kept`, the mean of the sampled mask over every unit.
MASK_KEPT = "mask_kept"
SCORE_PREFIX = "mask."
SAMPLE_PREFIX = "mask_sample."
REF_PREFIX = "score_ref."


def exit_name(i: int) -> str:
    return f"{EXIT_PREFIX}{i}"


@dataclass(frozen=True)
class BuiltModel:
    model: onnx.ModelProto
    layout: ParamLayout
    flops_per_sample: int  # forward pass, 2 x multiply-accumulates of conv and dense layers
    init: FloatArray  # initial flat parameters in layout order
    flops_by_weight: Mapping[str, int] = field(default_factory=dict)  # forward FLOPs per weight tensor
    # Per hidden group, the last post-ReLU tensor whose channel axis (1) is that group, and its
    # per-sample shape: where Chen & Qin's filter relevance reads the activations (models/relevance.py).
    activations: Mapping[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)


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
    activations: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    counter: int = 0
    depth: int = 0  # Structure.depth: 0 = plain model, d = multi-exit model cut after block group d
    masked: bool = False  # the mask-learning graph (weights become inputs, scores are trained)
    exits: list[str] = field(default_factory=list)  # logits of exits 1..d, in order
    mask_units: list[str] = field(default_factory=list)  # the straight-through mask of each group
    extra_inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    unit_views: dict[tuple[str, bool], str] = field(default_factory=dict)

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
        k: int = 3, stride: int = 1, relu: bool = True, bias: bool = True, scale: str | None = None,
    ) -> tuple[str, tuple[int, int]]:
        """`cin` is (group or None, channel count if None); returns output name and spatial size.
        `scale` names a per-output-channel factor parameter (after W and b in the layout) that
        multiplies the conv's output: it is applied to W and b instead, the same product, so that
        nothing but the conv sits between its GEMM and a following Add + ReLU, which ONNX Runtime
        then fuses into one FusedConv (its sum input), in the forward pass and without the
        full-size Mul and its two full-size backward passes."""
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
        if scale is not None:
            s = self.param(scale, np.ones((c_out, 1, 1)), (AxisGroup(cout), None, None), "scale")
            inputs[1] = self.op("Mul", [w, self.op("Unsqueeze", [s, self.const_i64(f"{scale}.w_axes", [1])])])
            if bias:
                flat = self.op("Reshape", [s, self.const_i64(f"{scale}.b_shape", [-1])])
                inputs[2] = self.op("Mul", [inputs[2], flat])
        out = self.tmp(name)
        self.nodes.append(helper.make_node(
            "Conv", inputs, [out], kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride],
        ))
        h_out = (hw[0] + 2 * pad - k) // stride + 1
        w_out = (hw[1] + 2 * pad - k) // stride + 1
        self.flops_by_weight[w] = 2 * c_in * c_out * k * k * h_out * w_out
        self.flops += self.flops_by_weight[w]
        if not relu:
            return out, (h_out, w_out)
        act = self.scaled(self.relu(out), cout)
        self.activations[cout] = (act, (c_out, h_out, w_out))
        return act, (h_out, w_out)

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
        if not relu:
            return out
        act = self.scaled(self.relu(out), fout)
        self.activations[fout] = (act, (n_out,))
        return act

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

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        out = self.tmp(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def unit_mask(self, h: str, group: str, spatial: bool) -> str:
        """In the mask-learning graph, `h ⊙ m` over the channels of `group` (after the activation,
        so a unit masked to zero still gets a gradient through ReLU). Forward m = the fed sample;
        m = sample + σ(s₀)·(σ(s) − σ(s₀)) with s₀ = s fed back, so ∂m/∂σ(s) = σ(s): the authors'
        Bernoulli estimator (`Bern.backward` returns p·grad), composed with the sigmoid."""
        if not self.masked:
            return h
        if (group, spatial) in self.unit_views:
            return self.op("Mul", [h, self.unit_views[(group, spatial)]])
        n = self.channels[group]
        score = self.param(f"{SCORE_PREFIX}{group}", np.zeros(n), (AxisGroup(group),), "score")
        for prefix in (SAMPLE_PREFIX, REF_PREFIX):
            self.extra_inputs.append(helper.make_tensor_value_info(prefix + group, TensorProto.FLOAT, [n]))
        p = self.op("Sigmoid", [score])
        p_ref = self.op("Sigmoid", [REF_PREFIX + group])
        m = self.op("Add", [SAMPLE_PREFIX + group, self.op("Mul", [p_ref, self.op("Sub", [p, p_ref])])])
        self.mask_units.append(m)
        shape = self.const_i64(f"mask_shape.{group}", [1, n, 1, 1] if spatial else [1, n])
        self.unit_views[(group, spatial)] = self.op("Reshape", [m, shape])
        return self.op("Mul", [h, self.unit_views[(group, spatial)]])

    def const_i64(self, name: str, value: list[int]) -> str:
        self.nodes.append(helper.make_node("Constant", [], [name],
                                           value=numpy_helper.from_array(np.asarray(value, np.int64), name)))
        return name

    def exit_head(self, h: str, index: int, group: str) -> str:
        """Exit `index` on a conv feature map of `group`: global average pool, then a dense layer.
        The mask-learning graph keeps only the deepest exit (it trains on that one alone)."""
        if self.masked:
            return ""
        pooled = self.flatten(self.op("GlobalAveragePool", [h]))
        logits = self.dense(pooled, exit_name(index), (group, 0), 1, "classes", relu=False)
        self.exits.append(logits)
        return logits

    def wants(self, block: int) -> bool:
        """Whether block group `block` (1-based) is in the model."""
        return self.depth == 0 or block <= self.depth


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
    # VGG-style: two conv-conv-pool stages and one hidden dense layer. A multi-exit cnn has an exit
    # after stage 1 (emitted right after it, so a depth-1 model's parameters are a prefix of the
    # full model's); stage 2 ends in the model's own head.
    hw = (in_shape[1], in_shape[2])
    h, hw = g.conv(x, "conv1", (None, in_shape[0]), "conv1", hw)
    h = g.unit_mask(h, "conv1", True)
    h, hw = g.conv(h, "conv2", ("conv1", 0), "conv2", hw)
    h = g.unit_mask(h, "conv2", True)
    h, hw = g.maxpool(h, hw)
    if g.depth:
        if g.depth == 1:
            return _deepest_exit(g, h, 1, "conv2")
        g.exit_head(h, 1, "conv2")
    h, hw = g.conv(h, "conv3", ("conv2", 0), "conv3", hw)
    h = g.unit_mask(h, "conv3", True)
    h, hw = g.conv(h, "conv4", ("conv3", 0), "conv4", hw)
    h = g.unit_mask(h, "conv4", True)
    h, hw = g.maxpool(h, hw)
    h = g.dense(g.flatten(h), "fc1", ("conv4", 0), hw[0] * hw[1], "fc1", relu=True)
    h = g.unit_mask(h, "fc1", False)
    return g.dense(h, "out", ("fc1", 0), 1, "classes", relu=False)


def _deepest_exit(g: _Graph, h: str, index: int, group: str) -> str:
    """A model cut at block group `index` < the model's last ends in exit `index`."""
    masked, g.masked = g.masked, False  # the mask graph trains its deepest exit too
    try:
        out = g.exit_head(h, index, group)
    finally:
        g.masked = masked
    g.exits.pop()  # the deepest exit is `logits`, not one of the shallower outputs
    return out


def _resnet(g: _Graph, x: str, in_shape: tuple[int, ...]) -> str:
    # Three stages of one basic block each (ResNet-8). No batch norm, whose running statistics
    # neither ORT's training graph nor federated averaging carry well; instead a learnable
    # per-channel branch scale (SkipInit, De & Smith 2020). Initialised to one, not zero: with
    # only three blocks the variance growth is harmless, and zero made SGD stall for ~200 steps.
    # A multi-exit resnet has an exit after stages 1 and 2, each emitted right after its stage.
    # In the mask graph a stage's channel mask multiplies every producer of that group (the stem
    # and each block's output), which is what slicing the group out of every tensor does.
    hw = (in_shape[1], in_shape[2])
    h, hw = g.conv(x, "stem", (None, in_shape[0]), "s1", hw)
    h = g.unit_mask(h, "s1", True)
    prev = "s1"
    for i, (stage, stride) in enumerate((("s1", 1), ("s2", 2), ("s3", 2)), start=1):
        if not g.wants(i):
            break
        inner = f"b{i}"
        y, hw_out = g.conv(h, f"block{i}.conv1", (prev, 0), inner, hw, stride=stride)
        y = g.unit_mask(y, inner, True)
        y, _ = g.conv(y, f"block{i}.conv2", (inner, 0), stage, hw_out, relu=False, scale=f"block{i}.scale")
        if stage != prev or stride != 1:
            skip, _ = g.conv(h, f"block{i}.proj", (prev, 0), stage, hw, k=1, stride=stride, relu=False, bias=False)
        else:
            skip = h
        h, hw, prev = g.relu(g.op("Add", [y, skip])), hw_out, stage
        h = g.unit_mask(h, stage, True)  # s1 again: the stem's mask, shared by its group
        g.activations[stage] = (h, (g.channels[stage], *hw))
        if g.depth and i < 3:
            if i == g.depth:
                return _deepest_exit(g, h, i, stage)
            g.exit_head(h, i, stage)
    pooled = g.flatten(g.op("GlobalAveragePool", [h]))
    return g.dense(pooled, "out", (prev, 0), 1, "classes", relu=False)


_BODIES: dict[str, Callable[[_Graph, str, tuple[int, ...]], str]] = {
    "mlp": _mlp,
    "lenet": _lenet,
    "cnn": _cnn,
    "resnet": _resnet,
}


def build(structure: Structure, seed: int = 0, act_scale: Mapping[str, float] | None = None,
          masked: bool = False) -> BuiltModel:
    """Emit the ONNX graph, layout, FLOPs and initial weights of `structure`; `act_scale` multiplies
    the activations (after ReLU) of the layers whose output channels form the named groups.

    `masked`: the mask-learning graph of a multi-exit structure (Co-S²P): the weights are graph
    inputs (frozen; the device feeds them by name), the layout holds only the scores."""
    if masked and not structure.depth:
        raise ConfigError(f"the mask-learning graph needs a multi-exit structure ({structure.model} depth 0)")
    channels = dict(structure.channels)
    channels["classes"] = structure.num_outputs
    g = _Graph(channels=channels, rng=np.random.default_rng(seed), act_scale=dict(act_scale or {}),
               depth=structure.depth, masked=masked)
    logits = _BODIES[structure.model](g, INPUT, structure.input_shape)
    g.nodes.append(helper.make_node("Identity", [logits], [LOGITS]))
    n_out = structure.num_outputs
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["N", n_out])]
    for i, name in enumerate(g.exits, start=1):
        g.nodes.append(helper.make_node("Identity", [name], [exit_name(i)]))
        outputs.append(helper.make_tensor_value_info(exit_name(i), TensorProto.FLOAT, ["N", n_out]))
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", *structure.input_shape])]
    inits = g.inits
    if masked:
        g.nodes.append(helper.make_node("ReduceMean", [g.op("Concat", g.mask_units, axis=0)], [MASK_KEPT],
                                        keepdims=0))
        outputs.append(helper.make_tensor_value_info(MASK_KEPT, TensorProto.FLOAT, []))
        scores = {name for name, *_ in g.specs if name.startswith(SCORE_PREFIX)}
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims))
                   for t in inits if t.name not in scores]
        inputs += g.extra_inputs
        inits = [t for t in inits if t.name in scores]
        g.specs = [spec for spec in g.specs if spec[0] in scores]
    graph = helper.make_graph(g.nodes, f"orchard_{structure.model}", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="orchard")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    specs, offset = [], 0
    for name, shape, axes, kind in g.specs:
        specs.append(ParamSpec(name=name, shape=shape, offset=offset, axes=axes, kind=kind))
        offset += math.prod(shape)
    layout = ParamLayout(params=tuple(specs), groups=channels)
    init = np.concatenate([numpy_helper.to_array(t).reshape(-1) for t in inits]).astype(np.float32)
    return BuiltModel(model=model, layout=layout, flops_per_sample=g.flops, init=init,
                      flops_by_weight=dict(g.flops_by_weight), activations=dict(g.activations))
