"""Cut a model into consecutive parts and make each part an ONNX Runtime training artifact (MP-SL).

A *layer* here is the smallest piece the graph can be cut around: a run of nodes holding at least
one parameter, ending where exactly one tensor crosses to the rest of the graph (so a residual
block is one layer, a conv with its ReLU and pool is one layer). A split of P parts is P - 1 cut
points, each the name of the layer a part ends with.

ORT's training API returns parameter gradients only, and its Module runs forward and backward in
one call. So every part but the first adds a trainable zero *probe* to its input (`x + z`, z of
the batch's full shape): grad(z) = dL/dx, which the part sends upstream. Every part but the last
is trained on the loss `sum(out * g)`, with `g` (graph input `grad`) the gradient of its output
received from downstream: its parameter gradients are then exactly the chain rule's (methods.md
§4.8). Because forward and backward cannot be separated, a part's backward task reruns its
forward on the stored input (recompute, as activation checkpointing does); the node keeps only
the input per pending batch, not every intermediate activation. The probe fixes the batch size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.artifacts import (
    BUILDER_VERSION,
    ONNX_VERSION,
    _native_stderr_captured,
    default_cache_dir,
)
from models.builder import INPUT, IR_VERSION, LOGITS, OPSET, BuiltModel, build
from models.grad_rewrite import rewrite_training_graph
from models.structure import Structure
from runtime import __version__ as orchard_version
from runtime.errors import ArtifactError, ConfigError
from runtime.layout import ParamLayout, ParamSpec
from runtime.manifest import ARTIFACT_FILES, FORMAT, MANIFEST, file_sha256, manifest_digest, read_manifest
from runtime.ort import onnxruntime_version, training_artifacts_module
from runtime.split import GRAD, PROBE, PartPosition

SPLIT_VERSION = 1  # bump when part graphs change


@dataclass(frozen=True)
class Layer:
    name: str
    nodes: tuple[int, ...]  # indices into the full graph's nodes
    params: tuple[str, ...]
    output: str  # the one tensor that leaves the layer
    out_shape: tuple[int, ...]  # per sample


@dataclass(frozen=True)
class Part(PartPosition):
    index: int  # 0 .. P-1
    count: int  # P
    layers: tuple[str, ...]
    in_shape: tuple[int, ...]  # per sample
    out_shape: tuple[int, ...]
    layout: ParamLayout  # the part's own parameters (no probe), offsets from 0
    full_offsets: tuple[tuple[int, int], ...]  # (start, end) of each param in the full model's buffer


def _per_sample(vi: onnx.ValueInfoProto) -> tuple[int, ...]:
    dims = vi.type.tensor_type.shape.dim
    return tuple(int(d.dim_value) for d in dims[1:])


def layers_of(built: BuiltModel) -> list[Layer]:
    """The model's cuttable layers, in order."""
    graph = built.model.graph
    init_order = [t.name for t in graph.initializer]
    inits = set(init_order)
    nodes = list(graph.node)
    consumers_after: list[set[str]] = []  # tensors read by nodes i+1..end
    seen: set[str] = set()
    for node in reversed(nodes):
        consumers_after.append(set(seen))
        seen.update(n for n in node.input if n not in inits)
    consumers_after.reverse()
    produced: set[str] = {INPUT}
    boundaries: list[tuple[int, str]] = []  # (last node index, the one crossing tensor)
    for i, node in enumerate(nodes):
        produced.update(node.output)
        live = produced & consumers_after[i]
        if i == len(nodes) - 1:
            boundaries.append((i, LOGITS))
        elif len(live) == 1:
            boundaries.append((i, next(iter(live))))
    inferred = onnx.shape_inference.infer_shapes(built.model)
    shapes = {vi.name: _per_sample(vi) for vi in (*inferred.graph.value_info, *inferred.graph.output)}
    layers: list[Layer] = []
    start = 0
    pending: list[int] = []
    prev_tensor = INPUT
    for end, tensor in boundaries:
        seg = list(range(start, end + 1))
        start = end + 1
        has_params = any(n in inits for i in seg for n in nodes[i].input)
        if has_params and pending and any(n in inits for i in pending for n in nodes[i].input):
            layers.append(_layer(nodes, init_order, pending, prev_tensor, shapes))
            pending = []
        pending += seg
        prev_tensor = tensor
    layers.append(_layer(nodes, init_order, pending, prev_tensor, shapes))
    return layers


def _layer(nodes: list[onnx.NodeProto], inits: list[str], idx: list[int], out: str,
           shapes: dict[str, tuple[int, ...]]) -> Layer:
    # In the initializers' (the layout's) order, which a part's graph and ORT keep, not the order
    # the nodes first read them in (the ResNet's branch scale is read before its conv's weights).
    used = {n for i in idx for n in nodes[i].input}
    params = tuple(n for n in inits if n in used)
    return Layer(name=params[0].split(".")[0], nodes=tuple(idx), params=params, output=out, out_shape=shapes[out])


def plan_parts(built: BuiltModel, cuts: Sequence[str], input_shape: tuple[int, ...]) -> list[Part]:
    """The parts of `built` cut after each layer named in `cuts`; ConfigError names a bad cut."""
    layers = layers_of(built)
    names = [layer.name for layer in layers]
    bounds: list[int] = []
    for cut in cuts:
        if cut not in names[:-1]:
            raise ConfigError(f"cut point {cut!r} is not a layer of this model that can end a part; "
                              f"choose among {', '.join(names[:-1])}")
        bounds.append(names.index(cut) + 1)
    if bounds != sorted(set(bounds)):
        raise ConfigError(f"cut points {list(cuts)} must be distinct and in model order ({', '.join(names)})")
    edges = [0, *bounds, len(layers)]
    full = {p.name: p for p in built.layout.params}
    parts = []
    for k in range(len(edges) - 1):
        group = layers[edges[k]:edges[k + 1]]
        specs, offsets, off = [], [], 0
        for layer in group:
            for name in layer.params:
                p = full[name]
                specs.append(ParamSpec(name=p.name, shape=p.shape, offset=off, axes=p.axes, kind=p.kind))
                offsets.append((p.offset, p.end))
                off += p.size
        in_shape = input_shape if k == 0 else layers[edges[k] - 1].out_shape
        parts.append(Part(index=k, count=len(edges) - 1, layers=tuple(layer.name for layer in group),
                          in_shape=tuple(in_shape), out_shape=group[-1].out_shape,
                          layout=ParamLayout(params=tuple(specs), groups=dict(built.layout.groups)),
                          full_offsets=tuple(offsets)))
    return parts


def part_graph(built: BuiltModel, part: Part, batch: int) -> onnx.ModelProto:
    """The forward graph of one part: `input` (+ probe unless first) -> `logits` (its output)."""
    layers = {layer.name: layer for layer in layers_of(built)}
    mine = [layers[n] for n in part.layers]
    all_layers = list(layers.values())
    pos = [layer.name for layer in all_layers].index(part.layers[0])
    src = INPUT if pos == 0 else all_layers[pos - 1].output
    graph = built.model.graph
    nodes = [graph.node[i] for layer in mine for i in layer.nodes]
    wanted = {n for layer in mine for n in layer.params}
    inits = [t for t in graph.initializer if t.name in wanted]
    head: list[onnx.NodeProto] = []
    if not part.first:
        inits.append(numpy_helper.from_array(np.zeros((batch, *part.in_shape), np.float32), PROBE))
        head.append(helper.make_node("Add", [INPUT, PROBE], [src]))
    tail: list[onnx.NodeProto] = []
    out = mine[-1].output
    if out != LOGITS:
        tail.append(helper.make_node("Identity", [out], [LOGITS]))
    g = helper.make_graph(
        [*head, *nodes, *tail], f"orchard_part{part.index}",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [batch, *part.in_shape])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [batch, *part.out_shape])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="orchard")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _grad_loss() -> object:
    """L = sum(out * g): its gradient w.r.t. out is g, so backprop continues the chain exactly."""
    training_artifacts_module()
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock import _graph_utils

    class GradLoss(onnxblock.Block):  # type: ignore[misc]
        def build(self, out: str, labels: str = "labels") -> str:  # labels: ORT's loss signature
            g = onnxblock.blocks.InputLike(out)(GRAD)
            prod = str(_graph_utils.generate_graph_name("gl_mul"))
            total = str(_graph_utils.generate_graph_name("gl_sum"))
            self.base.graph.node.append(helper.make_node("Mul", [out, g], [prod]))
            self.base.graph.node.append(helper.make_node("ReduceSum", [prod], [total], keepdims=0))
            return total

    return GradLoss()


def part_key(structure: Structure, cuts: Sequence[str], index: int, batch: int) -> str:
    return structure.key({"split": list(cuts), "part": index, "batch": batch, "split_version": SPLIT_VERSION,
                          "builder": BUILDER_VERSION, "onnx": ONNX_VERSION, "ort": onnxruntime_version()})


def ensure_part_artifacts(structure: Structure, cuts: Sequence[str], batch: int,
                          cache_dir: Path | None = None, seed: int = 0) -> list[Path]:
    """A verified artifact directory per part (SGD), generated if needed, in part order."""
    if batch < 1:
        raise ConfigError(f"split batch {batch} must be at least 1")
    built = build(structure, seed)
    parts = plan_parts(built, cuts, structure.input_shape)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = []
    for part in parts:
        key = part_key(structure, cuts, part.index, batch)
        target = cache / key
        if target.exists():
            try:
                read_manifest(target, verify=True)
                out.append(target)
                continue
            except ArtifactError:
                shutil.rmtree(target, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
        try:
            _generate_part(built, structure, part, list(cuts), batch, key, tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                read_manifest(target, verify=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out.append(target)
    return out


def _generate_part(built: BuiltModel, structure: Structure, part: Part, cuts: list[str], batch: int,
                   key: str, out: Path) -> None:
    model = part_graph(built, part, batch)
    art = training_artifacts_module()
    trainable = [*part.layout.names, *([] if part.first else [PROBE])]
    loss = art.LossType.CrossEntropyLoss if part.last else _grad_loss()
    with _native_stderr_captured(f"generating split part {part.index} of {structure.model} {cuts}"):
        art.generate_artifacts(model, requires_grad=trainable, frozen_params=[], loss=loss,
                               optimizer=art.OptimType.SGD, artifact_directory=str(out),
                               additional_output_names=[LOGITS])
    # The runtime's buffer is the part's parameters, then the probe: check ORT kept that order.
    training = onnx.load(str(out / "training_model.onnx"), load_external_data=False)
    if rewrite_training_graph(training):  # as models/artifacts.py does for whole models
        onnx.save(training, str(out / "training_model.onnx"))
    order = tuple(i.name for i in training.graph.input if i.name in set(trainable))
    if order != tuple(trainable):
        raise ArtifactError(f"ORT reordered the parameters of split part {part.index}: {order[:4]}...")
    specs = list(part.layout.params)
    if not part.first:
        shape = (batch, *part.in_shape)
        specs.append(ParamSpec(name=PROBE, shape=shape, offset=part.layout.total, axes=(None,) * len(shape),
                               kind="probe"))
    layout = ParamLayout(params=tuple(specs), groups=dict(part.layout.groups))
    manifest = {
        "format": FORMAT, "key": key, "structure": structure.to_dict(), "layout": layout.to_dict(),
        "params": layout.total, "flops_per_sample": 0, "optimizer": "sgd",
        "loss": "cross_entropy" if part.last else "grad_injection",
        "split": {"cuts": cuts, "part": part.index, "parts": part.count, "batch": batch,
                  "layers": list(part.layers), "in_shape": list(part.in_shape),
                  "out_shape": list(part.out_shape), "weights": part.layout.total,
                  "full_offsets": [list(o) for o in part.full_offsets]},
        "opset": OPSET, "ir_version": IR_VERSION,
        "versions": {"orchard": orchard_version, "onnx": ONNX_VERSION, "onnxruntime": onnxruntime_version(),
                     "builder": BUILDER_VERSION, "split": SPLIT_VERSION},
        "files": {name: file_sha256(out / name) for name in ARTIFACT_FILES},
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def part_nbytes(part: Part) -> int:
    """float32 bytes of one copy of the part's weights."""
    return 4 * part.layout.total


def activation_nbytes(shape: Sequence[int], batch: int) -> int:
    return 4 * batch * math.prod(shape)
