"""The relevance artifact: a training graph whose only gradients are `A · ∂z_c/∂A` per hidden group.

Chen & Qin's filter relevance (methods.md §3.2) needs the gradient of a class logit with respect
to intermediate activations. ONNX Runtime 1.19.2's training API only hands out gradients of
*parameters*, so each activation `A` the relevance reads (models/builder.py records the last
post-ReLU tensor per group) is multiplied by a probe parameter `S` of ones, shape (B, *A's
per-sample shape), and everything downstream reads `A ⊙ S`. At `S = 1`

    ∂L/∂S = A ⊙ ∂L/∂(A ⊙ S) = A ⊙ ∂L/∂A,

which is the product the score takes ReLU and the spatial mean of, element by element. The
loss is `Σ_b Σ_c selector[b, c] · z[b, c]` with a one-hot `selector` input: samples do not
interact (no batch norm), so one backward gives every sample the gradient of its own class's
logit, and zero rows pad the last batch. Only the probes require gradients; the model's
parameters are frozen and set by name from the global buffer (runtime/relevance.py runs it).
An inference session could expose the activations but not their gradients; writing the
backward graph by hand would duplicate what ORT's gradient builder already derives.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from models.artifacts import BUILDER_VERSION, ONNX_VERSION, _native_stderr_captured, default_cache_dir
from models.builder import LOGITS, build
from models.structure import Structure
from runtime.errors import ArtifactError, ConfigError
from runtime.manifest import file_sha256
from runtime.ort import onnxruntime_version, training_artifacts_module
from runtime.relevance import (
    PROBE_PREFIX,
    RELEVANCE_FILES,
    RELEVANCE_MANIFEST,
    SELECTOR,
    read_relevance_manifest,
)

__all__ = ["ensure_relevance_artifact", "relevance_key"]


def _probed_model(structure: Structure, batch: int) -> tuple[onnx.ModelProto, list[str], dict[str, Any]]:
    built = build(structure)
    model = built.model
    graph = model.graph
    probes: dict[str, Any] = {}
    for group, (tensor, shape) in built.activations.items():
        probe, probed = f"{PROBE_PREFIX}{group}", f"{tensor}_probed"
        for node in graph.node:  # every reader of the activation reads the probed one
            node.input[:] = [probed if i == tensor else i for i in node.input]
        graph.node.append(helper.make_node("Mul", [tensor, probe], [probed], name=f"probe_{group}"))
        graph.initializer.append(numpy_helper.from_array(np.ones((batch, *shape), dtype=np.float32), probe))
        probes[group] = {"probe": probe, "shape": list(shape)}
    # Nodes must stay topologically sorted: each Mul goes right after the tensor it reads.
    order = list(graph.node)
    muls = {n.input[0]: n for n in order if n.op_type == "Mul" and n.name.startswith("probe_")}
    rest = [n for n in order if n not in muls.values()]
    sorted_nodes = []
    for node in rest:
        sorted_nodes.append(node)
        for out in node.output:
            if out in muls:
                sorted_nodes.append(muls[out])
    del graph.node[:]
    graph.node.extend(sorted_nodes)
    graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    onnx.checker.check_model(model)
    return model, list(built.layout.names), probes


def _selected_logit_loss() -> Any:
    training_artifacts_module()  # registers the training package without its torch import
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock import _graph_utils

    class SelectedLogit(onnxblock.Block):  # type: ignore[misc]
        def build(self, logits: str) -> str:
            selector = onnxblock.blocks.InputLike(logits)(SELECTOR)
            product = str(_graph_utils.generate_graph_name("relevance_mul"))
            out = str(_graph_utils.generate_graph_name("relevance_sum"))
            self.base.graph.node.append(helper.make_node("Mul", [logits, selector], [product]))
            self.base.graph.node.append(helper.make_node("ReduceSum", [product], [out], keepdims=0))
            return out

    return SelectedLogit()


def relevance_key(structure: Structure, batch: int) -> str:
    return structure.key({"relevance_batch": batch, "builder": BUILDER_VERSION, "onnx": ONNX_VERSION,
                          "ort": onnxruntime_version(), "kind": "relevance"})


def ensure_relevance_artifact(structure: Structure, batch: int, cache_dir: Path | None = None) -> Path:
    """A verified relevance artifact directory for the full model `structure`, cached by key."""
    if not 1 <= batch <= 4096:
        raise ConfigError(f"relevance batch {batch} must be in [1, 4096]")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = relevance_key(structure, batch)
    target = cache / key
    if target.exists():
        try:
            read_relevance_manifest(target)
            return target
        except ArtifactError:
            shutil.rmtree(target, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        model, frozen, probes = _probed_model(structure, batch)
        art = training_artifacts_module()
        with _native_stderr_captured(f"generating the relevance artifact for {structure.model}"):
            art.generate_artifacts(model, requires_grad=[p["probe"] for p in probes.values()],
                                   frozen_params=frozen, loss=_selected_logit_loss(), optimizer=art.OptimType.SGD,
                                   artifact_directory=str(tmp), additional_output_names=[LOGITS])
        manifest = {"key": key, "structure": structure.to_dict(), "batch": batch, "params": frozen,
                    "probes": probes, "files": {n: file_sha256(tmp / n) for n in RELEVANCE_FILES}}
        (tmp / RELEVANCE_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        try:
            os.rename(tmp, target)
        except OSError:
            read_relevance_manifest(target)  # another process published it first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


