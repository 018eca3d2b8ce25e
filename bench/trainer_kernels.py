"""Single ONNX Runtime kernels at one thread, median CPU us (the trainer bench's `gemm.kernels_us`
and `gemm.alternatives_us`): what the graph rewrites (models/grad_rewrite.py) replace and cost,
and the forms measured against them and not taken, each checked to compute the same values."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"


def _model(nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray], outputs: list[str]) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "kernel", [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape))
                                            for n, v in feeds.items()],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    return model


def _session(model: onnx.ModelProto) -> Any:
    from runtime.ort import onnxruntime

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    return onnxruntime.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _median_us(model: onnx.ModelProto, feeds: dict[str, np.ndarray], reps: int) -> float:
    sess = _session(model)
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(reps * 3):
        c0 = time.process_time()
        sess.run(None, feeds)
        times.append(time.process_time() - c0)
    return round(statistics.median(times) * 1e6, 1)


def _i64(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(values, np.int64), name))


def kernel_costs(reps: int) -> dict[str, float]:
    """Median CPU us of single ORT kernels on one CNN width-0.25 activation (32x8x32x32 floats),
    one thread: the backward ReLU as ORT generates it and as models/grad_rewrite.py rewrites it;
    max pooling with and without the index output ORT's training graph needs, and the rewrite's
    pool forward + backward (ReLU mask folded in; ORT's MaxPoolGrad cannot run outside a training
    session, its cost is in `profile`); the 3x3 8->8 conv's ConvGrad with all three outputs,
    with dW and dB only, and the rewrite's dX by a forward Conv."""
    import numpy as np
    from onnx import TensorProto, helper

    from models.grad_rewrite import rewrite_conv_input_grads, rewrite_training_graph

    shape = [32, 8, 32, 32]
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [1, 1]}
    ms = "com.microsoft"
    pool_pattern = [helper.make_node("Relu", ["x"], ["xr"]), helper.make_node("MaxPool", ["xr"], ["y", "i"], **pool),
                    helper.make_node("MaxPoolGrad", ["dy_pooled", "i"], ["dxp"], **pool),
                    helper.make_node("ReluGrad", ["dxp", "xr"], ["dx"], domain=ms)]
    conv_grad = [helper.make_node("ConvGrad", ["dy", "x", "w"], ["dx", "dw", "db"], domain=ms, **conv)]
    graphs = {  # name: (nodes, inputs, outputs with their element type)
        "relu_grad_ort": ([helper.make_node("ReluGrad", ["dy", "x"], ["dx"], domain=ms)], ["dy", "x"], ["dx"]),
        "relu_grad_rewritten": ([helper.make_node("ReluGrad", ["dy", "x"], ["dx"], domain=ms)], ["dy", "x"], ["dx"]),
        "mul": ([helper.make_node("Mul", ["dy", "x"], ["dx"])], ["dy", "x"], ["dx"]),
        "maxpool": ([helper.make_node("MaxPool", ["x"], ["y"], **pool)], ["x"], ["y"]),
        "maxpool_with_indices": ([helper.make_node("MaxPool", ["x"], ["y", "i"], **pool)], ["x"], ["y", "i"]),
        "pool_rewritten_forward_backward": (pool_pattern, ["x", "dy_pooled"], ["y", "dx"]),
        "conv_grad": (conv_grad, ["dy", "x", "w"], ["dx", "dw", "db"]),
        "conv_grad_weights_only": (
            [helper.make_node("ConvGrad", ["dy", "x", "w"], ["", "dw", "db"], domain=ms, **conv)],
            ["dy", "x", "w"], ["dw", "db"]),
        "conv_input_grad_rewritten": (conv_grad, ["dy", "x", "w"], ["dx"]),
    }
    rng = np.random.default_rng(0)
    feeds_all = {"x": rng.normal(size=shape).astype(np.float32), "dy": rng.normal(size=shape).astype(np.float32),
                 "dy_pooled": rng.normal(size=[32, 8, 16, 16]).astype(np.float32),
                 "w": rng.normal(size=[8, 8, 3, 3]).astype(np.float32)}
    feeds_all["x"] = np.maximum(feeds_all["x"], 0)  # a ReLU's output, as the pool and the conv see it
    pooled = [32, 8, 16, 16]
    out_shapes = {"dx": shape, "y": pooled, "i": pooled, "dw": [8, 8, 3, 3], "db": [8]}
    out: dict[str, float] = {}
    for name, (nodes, inputs, outputs) in graphs.items():
        ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(feeds_all[n].shape)) for n in inputs]
        g = helper.make_graph(
            nodes, name, ins,
            [helper.make_tensor_value_info(n, TensorProto.INT64 if n == "i" else TensorProto.FLOAT, out_shapes[n])
             for n in outputs])
        opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(ms, 1)] if any(n.domain for n in nodes) else [])
        model = helper.make_model(g, opset_imports=opsets)
        model.ir_version = 8
        if name in ("relu_grad_rewritten", "pool_rewritten_forward_backward"):
            assert rewrite_training_graph(model) == 1
        elif name == "conv_input_grad_rewritten":
            assert rewrite_conv_input_grads(model) == 1
            model.graph.node.pop()  # dX only: ConvGrad's dW and dB are the weights-only row
        out[name] = _median_us(model, {n: feeds_all[n] for n in inputs}, reps)
    return out


# Stride-2 3x3 conv taps by output phase: an even output row reads kernel row 1, an odd one rows
# 2 and 0 (of dY rows m and m+1).
_PHASE_TAPS = {0: [1], 1: [2, 0]}


def _stride2_input_grad_polyphase() -> list[onnx.NodeProto]:
    """dX of a 3x3/stride-2/pad-1 conv as four forward convs of dY, one per output phase (1x1, 1x2,
    2x1, 2x2 taps of the transposed weights: exactly dX's MACs), interleaved by DepthToSpace."""
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0, 2, 3])]
    phases = []
    for a in (0, 1):
        for b in (0, 1):
            p = f"p{a}{b}"
            nodes += [_i64(f"{p}_rows", _PHASE_TAPS[a]), _i64(f"{p}_cols", _PHASE_TAPS[b]),
                      helper.make_node("Gather", ["wt", f"{p}_rows"], [f"{p}_w1"], axis=2),
                      helper.make_node("Gather", [f"{p}_w1", f"{p}_cols"], [f"{p}_w"], axis=3),
                      helper.make_node("Conv", ["dy", f"{p}_w"], [p], kernel_shape=[len(_PHASE_TAPS[a]),
                                       len(_PHASE_TAPS[b])], pads=[0, 0, a, b], strides=[1, 1])]
            phases.append(p)
    return [*nodes, helper.make_node("Concat", phases, ["cat"], axis=1),
            helper.make_node("DepthToSpace", ["cat"], ["dx"], blocksize=2, mode="DCR")]


def _pool_backward_native(c: int, h: int, w: int) -> list[onnx.NodeProto]:
    """The rewrite's pool backward (tie split included) without SpaceToDepth/DepthToSpace: the
    window axes stay in NCHW order, [N, C, H/2, 2, W/2, 2], and the pooled tensors broadcast."""
    return [_i64("s6", [-1, c, h // 2, 2, w // 2, 2]), _i64("s6y", [-1, c, h // 2, 1, w // 2, 1]),
            _i64("s4", [-1, c, h, w]), _i64("ax35", [3, 5]),
            helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Reshape", ["x", "s6"], ["x6"]), helper.make_node("Reshape", ["y", "s6y"], ["y6"]),
            helper.make_node("Reshape", ["dy", "s6y"], ["dy6"]), helper.make_node("Equal", ["x6", "y6"], ["hit"]),
            helper.make_node("Cast", ["hit"], ["hitf"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["hitf", "ax35"], ["ties"], keepdims=1),
            helper.make_node("Div", ["dy6", "ties"], ["share"]), helper.make_node("Mul", ["hitf", "share"], ["dx6"]),
            helper.make_node("Reshape", ["dx6", "s4"], ["dx"])]


def _pool_backward_resize() -> list[onnx.NodeProto]:
    """The same backward at full size, the pooled tensors upsampled by nearest Resize."""
    scales = numpy_helper.from_array(np.asarray([1, 1, 2, 2], np.float32), "up")
    quarter = numpy_helper.from_array(np.asarray(4.0, np.float32), "four")
    return [helper.make_node("Constant", [], ["up"], value=scales),
            helper.make_node("Constant", [], ["four"], value=quarter),
            helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Resize", ["y", "", "up"], ["y_up"], mode="nearest"),
            helper.make_node("Equal", ["x", "y_up"], ["hit"]),
            helper.make_node("Cast", ["hit"], ["hitf"], to=TensorProto.FLOAT),
            helper.make_node("AveragePool", ["hitf"], ["tie_mean"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Mul", ["tie_mean", "four"], ["ties"]), helper.make_node("Div", ["dy", "ties"], ["share"]),
            helper.make_node("Resize", ["share", "", "up"], ["share_up"], mode="nearest"),
            helper.make_node("Mul", ["hitf", "share_up"], ["dx"])]


def alternative_costs(reps: int) -> dict[str, float]:
    """Median CPU us of forms measured against the trainer's graph and not taken, next to what is
    used, one thread, each checked against it: on ResNet-8's block-2 conv (3x3, 16 -> 32, stride 2,
    32x16x32x32 input) its forward, the same conv at stride 1 on a 16x16 input (same output, taps
    and MACs: the rest is the stride-2 im2col), ConvGrad with and without dX, and dX by four
    forward convs (`conv_input_grad_stride2_polyphase`); on the CNN width-0.25 pool input
    (32x8x32x32) the pool's forward + backward with the window axes in NCHW order or with Resize
    upsampling instead of SpaceToDepth/DepthToSpace (compare `kernels_us`'s
    `pool_rewritten_forward_backward` without the ReLU mask: `pool_rewritten_no_relu`), and
    DepthToSpace alone; the ReLU mask as Greater + Where or Greater + Cast + Mul (compare
    `kernels_us.relu_grad_rewritten`)."""
    from models.grad_rewrite import rewrite_max_pools

    rng = np.random.default_rng(0)
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    s2 = {"x": rng.normal(size=(32, 16, 32, 32)).astype(np.float32),
          "w": rng.normal(size=(32, 16, 3, 3)).astype(np.float32),
          "dy": rng.normal(size=(32, 32, 16, 16)).astype(np.float32)}
    x_pool = np.maximum(rng.normal(size=(32, 8, 32, 32)), 0).astype(np.float32)
    x_pool[:, :, :4] = 0  # a zero band: tied maxima, as a flat image region gives
    pool = {"x": x_pool, "dy": rng.normal(size=(32, 8, 16, 16)).astype(np.float32)}
    relu = {"t": x_pool, "dy": rng.normal(size=x_pool.shape).astype(np.float32)}
    zero = helper.make_node("Constant", [], ["zero"],
                            value=numpy_helper.from_array(np.asarray(0.0, np.float32), "zero"))
    rewritten_pool = _model([helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2], strides=[2, 2]),
                             helper.make_node("MaxPoolGrad", ["dy", "i"], ["dx"], domain=MS, kernel_shape=[2, 2],
                                              strides=[2, 2])], pool, ["y", "dx"])
    assert rewrite_max_pools(rewritten_pool) == 1
    # name: model, feeds, the form whose values it must equal
    cases: dict[str, tuple[onnx.ModelProto, dict[str, np.ndarray], str | None]] = {
        "conv_stride2_forward": (
            _model([helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], **conv)],
                   {k: s2[k] for k in ("x", "w")}, ["y"]), {k: s2[k] for k in ("x", "w")}, None),
        "conv_stride1_same_output": (
            _model([helper.make_node("Conv", ["x", "w"], ["y"], strides=[1, 1], **conv)],
                   {"x": s2["x"][:, :, :16, :16], "w": s2["w"]}, ["y"]),
            {"x": np.ascontiguousarray(s2["x"][:, :, :16, :16]), "w": s2["w"]}, None),
        "conv_grad_stride2": (
            _model([helper.make_node("ConvGrad", ["dy", "x", "w"], ["dx", "dw", "db"], domain=MS, strides=[2, 2],
                                     **conv)], s2, ["dx", "dw", "db"]), s2, None),
        "conv_grad_stride2_weights_only": (
            _model([helper.make_node("ConvGrad", ["dy", "x", "w"], ["", "dw", "db"], domain=MS, strides=[2, 2],
                                     **conv)], s2, ["dw", "db"]), s2, None),
        "conv_input_grad_stride2_polyphase": (
            _model(_stride2_input_grad_polyphase(), {k: s2[k] for k in ("dy", "w")}, ["dx"]),
            {k: s2[k] for k in ("dy", "w")}, "conv_grad_stride2"),
        "pool_rewritten_no_relu": (rewritten_pool, pool, None),
        "pool_backward_native_layout": (_model(_pool_backward_native(8, 32, 32), pool, ["y", "dx"]), pool,
                                        "pool_rewritten_no_relu"),
        "pool_backward_resize": (_model(_pool_backward_resize(), pool, ["y", "dx"]), pool, "pool_rewritten_no_relu"),
        "depth_to_space": (_model([helper.make_node("DepthToSpace", ["t"], ["o"], blocksize=2, mode="DCR")],
                                  {"t": s2["dy"]}, ["o"]), {"t": s2["dy"]}, None),
        "relu_mask_greater_where": (
            _model([zero, helper.make_node("Greater", ["t", "zero"], ["b"]),
                    helper.make_node("Where", ["b", "dy", "zero"], ["dx"])], relu, ["dx"]), relu, None),
        "relu_mask_greater_cast_mul": (
            _model([zero, helper.make_node("Greater", ["t", "zero"], ["b"]),
                    helper.make_node("Cast", ["b"], ["m"], to=TensorProto.FLOAT),
                    helper.make_node("Mul", ["dy", "m"], ["dx"])], relu, ["dx"]), relu, None),
    }
    out: dict[str, float] = {}
    for name, (model, feeds, same_as) in cases.items():
        if same_as is not None:  # the alternative computes what the form in use does
            ref_model, ref_feeds, _ = cases[same_as]
            got, want = _session(model).run(None, feeds), _session(ref_model).run(None, ref_feeds)
            scale = float(np.abs(want[0]).max())
            compared = want[:1] if same_as == "conv_grad_stride2" else want  # dX only, against ConvGrad's
            for g, w in zip(got, compared, strict=True):
                assert np.allclose(g, w, rtol=0, atol=2e-6 * scale), f"{name} differs from {same_as}"
        out[name] = _median_us(model, feeds, reps)
    return out
