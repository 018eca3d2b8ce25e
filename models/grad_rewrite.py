"""Rewrites of ORT's generated training graph that keep its arithmetic and cut its CPU time.

ReLU backward. ONNX Runtime 1.19's CPU `ReluGrad` (com.microsoft) runs ~33x slower than a `Mul`
of the same size (1.25 ms against 0.037 ms on 32x8x32x32 floats, one thread: bench.json
`trainer.gemm.kernels_us`), and was 17-32 % of a VGG-style `cnn` training step.
`dX = ReluGrad(dY, T)` is `dY` where `T > 0`, else 0, with `T` the ReLU's input or its output
(the gradient builder uses both); the same values come from `dY * Ceil(Clip(T, 0, 1))` (the mask
is exactly 0 for T <= 0 and 1 for T > 0, denormals included), in three vectorised passes that
together take 0.14 ms there.

Max pooling. A `MaxPool` that must also output the argmax indices its `MaxPoolGrad` reads runs
ORT's generic pooling loop, ~12x slower than the same pool without them (bench.json
`kernels_us`: maxpool vs maxpool_with_indices). A 2x2/stride-2 pool over even, static H, W is
rewritten without indices: `SpaceToDepth` puts the four window positions on their own axis,
`ReduceMax` over it gives the same pooled values bit for bit, and the backward is
`DepthToSpace(Equal(x_window, y) * dY / count)`, `count` the window positions equal to its
maximum. Where the maximum sits at one position that is dY there, bit for bit as ORT's
`MaxPoolGrad`; where it sits at several, each gets dY / count, where ORT gives all of dY to the
first. Such ties are not rare: a flat image region (a zero background, the zero padding) gives
equal conv outputs at every position, so each of the tied positions getting all of dY would
scale those regions' gradient by up to 4. Where the pool's input is a ReLU's output and the
pool's gradient only feeds that ReLU's backward, the ReLU mask is applied to dY at the pooled
size (y > 0 exactly where the chosen input is > 0), so windows at 0 get nothing either way and
the full-size mask passes go.

Conv input gradients. ORT's `ConvGrad` computes dX image by image as a GEMM into a column buffer
and a col2im scatter, ~1.3-1.4x the CPU of the forward conv of the same shape, while dW and dB
alone cost about one forward conv. For a stride-1, dilation-1, ungrouped conv with symmetric
padding p, dX is the forward convolution of dY with the weights transposed (in <-> out) and
flipped in both spatial axes, padded k-1-p: that runs ORT's (MLAS) forward conv, and `ConvGrad`
keeps dW and dB only. The sums run in another order, so dX differs from ConvGrad's in rounding
(a numpy reference test bounds it); dW and dB are untouched. The first conv's dX, which nothing
needs, ORT already leaves out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

_ZERO, _ONE = "orchard_relu_mask_zero", "orchard_relu_mask_one"
# Below this many input floats per sample, the forward Conv's five extra small nodes cost more
# than ConvGrad's dX path saves (LeNet on 8x8 digits: its convs take 24-96 floats per sample).
CONV_DX_MIN_FLOATS = 1024


def _relu_mask(t: str, d_y: str, out: str) -> list[onnx.NodeProto]:
    """`out = d_y * Ceil(Clip(t, 0, 1))`: `d_y` where `t > 0`, else 0."""
    stem = f"{out}_relu_mask"
    return [
        helper.make_node("Clip", [t, _ZERO, _ONE], [f"{stem}_clipped"], name=f"{stem}_clip"),
        helper.make_node("Ceil", [f"{stem}_clipped"], [stem], name=f"{stem}_ceil"),
        helper.make_node("Mul", [d_y, stem], [out], name=f"{stem}_mul"),
    ]


def _mask_constants() -> list[onnx.NodeProto]:
    return [helper.make_node("Constant", [], [name], name=name,
                             value=helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
            for name, value in ((_ZERO, 0.0), (_ONE, 1.0))]


def _set_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    """Replace the graph's nodes, with the mask constants first if a node reads them and the graph
    does not hold them yet; drop the shape records of tensors no node makes any more."""
    have = any(_ZERO in n.output for n in nodes)
    if not have and any(_ZERO in n.input for n in nodes):
        nodes = _mask_constants() + nodes
    made = {o for n in nodes for o in n.output}
    kept = [v for v in model.graph.value_info if v.name in made]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def rewrite_relu_grads(model: onnx.ModelProto) -> int:
    """Replace every `ReluGrad` of `model`'s graph in place; returns how many were replaced."""
    nodes: list[onnx.NodeProto] = []
    replaced = 0
    # The mask from a ReLU's output (y > 0 exactly where x > 0), so that nothing but the ReLU
    # reads the conv or dense output before it and ORT can fuse the pair (FusedConv, FusedGemm).
    relu_out: dict[str, str] = {}  # of the ReLUs before the node at hand, so the order stays topological
    for node in model.graph.node:
        if node.op_type == "Relu" and not node.domain:
            relu_out[node.input[0]] = node.output[0]
        if node.op_type != "ReluGrad" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        d_y, t = node.input
        nodes += _relu_mask(relu_out.get(t, t), d_y, node.output[0])
        replaced += 1
    if replaced:
        _set_nodes(model, nodes)
    return replaced


def _is_plain_2x2(node: onnx.NodeProto) -> bool:
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    return (list(a.get("kernel_shape", [])) == [2, 2] and list(a.get("strides", [])) == [2, 2]
            and not any(a.get("pads", [])) and all(d == 1 for d in a.get("dilations", [1, 1]))
            and a.get("ceil_mode", 0) == 0 and a.get("storage_order", 0) == 0
            and a.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID"))


def _static_chw(shapes: Mapping[str, list[int | str]], name: str) -> tuple[int, int, int] | None:
    dims = shapes.get(name)
    if dims is None or len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        return None
    c, h, w = (int(d) for d in dims[1:])
    return (c, h, w) if h % 2 == 0 and w % 2 == 0 else None


def _i64(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name,
                            value=numpy_helper.from_array(np.asarray(values, np.int64), name))


def rewrite_max_pools(model: onnx.ModelProto) -> int:
    """Replace every 2x2/stride-2 `MaxPool` with indices over an even, static C x H x W, and its
    `MaxPoolGrad`, in place (the module docstring has the rule); returns how many pools."""
    shapes = _shapes(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    relu_of = {n.output[0]: n for n in model.graph.node if n.op_type == "Relu" and not n.domain}
    pools: dict[str, tuple[onnx.NodeProto, tuple[int, int, int]]] = {}  # index output -> forward pool, its C, H, W
    for node in model.graph.node:
        if node.op_type == "MaxPool" and not node.domain and len(node.output) == 2 and _is_plain_2x2(node):
            chw = _static_chw(shapes, node.input[0])
            grads = consumers.get(node.output[1], [])
            if chw and grads and all(g.op_type == "MaxPoolGrad" for g in grads):
                pools[node.output[1]] = (node, chw)
    if not pools:
        return 0
    nodes: list[onnx.NodeProto] = []
    skip: set[int] = set()  # ReluGrads folded into a pool's backward
    for node in model.graph.node:
        if id(node) in skip:
            continue
        if node.op_type == "MaxPool" and len(node.output) == 2 and node.output[1] in pools:
            (c, h, w), x, y = pools[node.output[1]][1], node.input[0], node.output[0]
            stem = f"{y}_s2d"
            nodes += [
                _i64(f"{stem}_shape5", [-1, 4, c, h // 2, w // 2]),
                _i64(f"{stem}_axis1", [1]),
                helper.make_node("SpaceToDepth", [x], [f"{stem}_x4"], name=f"{stem}_x4", blocksize=2),
                helper.make_node("Reshape", [f"{stem}_x4", f"{stem}_shape5"], [f"{stem}_x5"], name=f"{stem}_x5"),
                helper.make_node("ReduceMax", [f"{stem}_x5"], [f"{stem}_y5"], name=f"{stem}_y5", axes=[1], keepdims=1),
                helper.make_node("Squeeze", [f"{stem}_y5", f"{stem}_axis1"], [y], name=f"{stem}_y"),
            ]
            continue
        if node.op_type == "MaxPoolGrad" and node.input[1] in pools:
            pool, (c, h, w) = pools[node.input[1]]
            x, y, stem = pool.input[0], pool.output[0], f"{pool.output[0]}_s2d"
            d_y, out = node.input[0], node.output[0]
            after = consumers.get(out, [])
            relu = relu_of.get(x)
            if (relu is not None and len(after) == 1 and after[0].op_type == "ReluGrad"
                    and after[0].domain == "com.microsoft" and after[0].input[0] == out
                    and after[0].input[1] in (x, relu.input[0])):
                # The ReLU's backward at the pooled size: y > 0 exactly where the chosen x > 0.
                nodes += _relu_mask(y, d_y, f"{stem}_dy_relu")
                d_y, out = f"{stem}_dy_relu", after[0].output[0]
                skip.add(id(after[0]))
            nodes += [
                helper.make_node("Unsqueeze", [d_y, f"{stem}_axis1"], [f"{stem}_dy5"], name=f"{stem}_dy5"),
                helper.make_node("Equal", [f"{stem}_x5", f"{stem}_y5"], [f"{stem}_hit"], name=f"{stem}_hit"),
                helper.make_node("Cast", [f"{stem}_hit"], [f"{stem}_hitf"], name=f"{stem}_hitf", to=TensorProto.FLOAT),
                # Each window's dY split evenly over the positions that hold its maximum: dY itself
                # where there is one (x / 1 is exact), and no more than dY in all where there are more.
                helper.make_node("ReduceSum", [f"{stem}_hitf", f"{stem}_axis1"], [f"{stem}_ties"],
                                 name=f"{stem}_ties", keepdims=1),
                helper.make_node("Div", [f"{stem}_dy5", f"{stem}_ties"], [f"{stem}_share"], name=f"{stem}_share"),
                helper.make_node("Mul", [f"{stem}_hitf", f"{stem}_share"], [f"{stem}_dx5"], name=f"{stem}_dx5"),
                _i64(f"{stem}_shape4", [-1, 4 * c, h // 2, w // 2]),
                helper.make_node("Reshape", [f"{stem}_dx5", f"{stem}_shape4"], [f"{stem}_dx4"], name=f"{stem}_dx4"),
                helper.make_node("DepthToSpace", [f"{stem}_dx4"], [out], name=f"{stem}_dx", blocksize=2, mode="DCR"),
            ]
            continue
        nodes.append(node)
    _set_nodes(model, nodes)
    return len(pools)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Each tensor's dims that ONNX shape inference finds (ints, or a symbol such as the batch)."""
    inferred = shape_inference.infer_shapes(model)
    return {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in (*inferred.graph.value_info, *inferred.graph.input)}


def rewrite_conv_input_grads(model: onnx.ModelProto, min_input_floats: int = CONV_DX_MIN_FLOATS) -> int:
    """Give every stride-1 `ConvGrad` whose input has at least `min_input_floats` per sample its
    input gradient by a forward `Conv` of dY with the flipped, transposed weights (the module
    docstring has why and where not); returns how many were rewritten."""
    shapes = _shapes(model)
    nodes: list[onnx.NodeProto] = []
    replaced = 0
    for node in model.graph.node:
        if node.op_type != "ConvGrad" or node.domain != "com.microsoft" or not node.output[0]:
            nodes.append(node)
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        kernel, pads = list(a.get("kernel_shape", [])), list(a.get("pads", [0, 0, 0, 0]))
        dims = shapes.get(node.input[1], [])
        per_sample = math.prod(int(d) for d in dims[1:]) if all(isinstance(d, int) for d in dims[1:]) else 0
        if (len(kernel) != 2 or len(dims) != 4 or list(a.get("strides", [1, 1])) != [1, 1]
                or any(d != 1 for d in a.get("dilations", [1, 1])) or a.get("group", 1) != 1
                or len(set(pads)) != 1 or not 0 <= pads[0] < min(kernel) or kernel[0] != kernel[1]
                or per_sample < min_input_floats):
            nodes.append(node)
            continue
        d_y, _, w = node.input
        d_x, stem = node.output[0], f"{node.output[0]}_conv"
        weights_only = onnx.NodeProto()
        weights_only.CopyFrom(node)
        weights_only.output[0] = ""  # ConvGrad skips dX when its output is unnamed
        nodes += [
            helper.make_node("Transpose", [w], [f"{stem}_wt"], name=f"{stem}_wt", perm=[1, 0, 2, 3]),
            _i64(f"{stem}_starts", [-1, -1]), _i64(f"{stem}_ends", [-(2**62), -(2**62)]),
            _i64(f"{stem}_axes", [2, 3]), _i64(f"{stem}_steps", [-1, -1]),
            helper.make_node("Slice", [f"{stem}_wt", f"{stem}_starts", f"{stem}_ends", f"{stem}_axes",
                                       f"{stem}_steps"], [f"{stem}_wf"], name=f"{stem}_wf"),
            helper.make_node("Conv", [d_y, f"{stem}_wf"], [d_x], name=stem, kernel_shape=kernel,
                             pads=[kernel[0] - 1 - pads[0]] * 4, strides=[1, 1]),
            weights_only,
        ]
        replaced += 1
    if replaced:
        _set_nodes(model, nodes)
    return replaced


def rewrite_training_graph(model: onnx.ModelProto) -> int:
    """Every rewrite above, pools first (a pool's backward may take over its ReLU's); returns how
    many nodes of ORT's were replaced."""
    return rewrite_conv_input_grads(model) + rewrite_max_pools(model) + rewrite_relu_grads(model)

