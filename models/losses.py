"""Graph variants: the loss a training artifact is generated with (its key includes it).

    ce              cross-entropy on the model's logits (every artifact so far)
    fd              cross-entropy, in a graph whose thinned groups scale their activations by
                    C_full / C_kept (inverted filter dropout, DISTREAL, methods.md §2.2)
    kd-<α>-<T>      FjORD-KD (methods.md §6.4): (1 − α)·CE(y, z) + α·T²·KL(softmax(t/T) ‖ softmax(z/T)),
                    with the teacher's logits t as a third training input `teacher` (the device
                    computes them with its p_max model on the same batch; no gradient flows to it)

The KD loss is written as an onnxblock so ORT derives its gradient graph like any other.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from runtime.backend import TEACHER, kd_variant
from runtime.errors import ConfigError
from runtime.ort import training_artifacts_module

DEFAULT_VARIANT = "ce"
FILTER_DROPOUT = "fd"
__all__ = ["DEFAULT_VARIANT", "kd_variant", "loss_for", "parse_variant"]


def parse_variant(variant: str) -> tuple[str, float, float]:
    """("ce", 0, 1) or ("kd", α, T); ConfigError naming the variant otherwise."""
    if variant in (DEFAULT_VARIANT, FILTER_DROPOUT):
        return "ce", 0.0, 1.0
    parts = variant.split("-")
    try:
        if len(parts) == 3 and parts[0] == "kd":
            alpha, temperature = float(parts[1]), float(parts[2])
            if 0.0 <= alpha <= 1.0 and temperature > 0:
                return "kd", alpha, temperature
    except ValueError:
        pass
    raise ConfigError(f"unknown graph variant {variant!r}; use 'ce', 'fd' or 'kd-<alpha in [0, 1]>-<temperature > 0>'")


def loss_for(variant: str) -> Any:
    """The `loss` argument of ORT's generate_artifacts for `variant`."""
    art = training_artifacts_module()
    kind, alpha, temperature = parse_variant(variant)
    if kind == "ce":
        return art.LossType.CrossEntropyLoss
    return _kd_loss(alpha, temperature)


def _kd_loss(alpha: float, temperature: float) -> Any:
    training_artifacts_module()  # registers the training package without its torch import
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock import _graph_utils

    class Node(onnxblock.Block):  # type: ignore[misc]
        def __init__(self, op: str, **attrs: Any) -> None:
            super().__init__()
            self.op, self.attrs = op, attrs

        def build(self, *inputs: str) -> str:
            out = str(_graph_utils.generate_graph_name(f"kd_{self.op.lower()}"))
            self.base.graph.node.append(onnx.helper.make_node(
                self.op, list(inputs), [out], _graph_utils.generate_graph_name(self.op), **self.attrs))
            return out

    class KDLoss(onnxblock.Block):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.ce = onnxblock.loss.CrossEntropyLoss()

        def const(self, value: Any, dtype: Any = np.float32) -> str:
            name = str(_graph_utils.generate_graph_name("kd_const"))
            self.base.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value, dtype), name))
            return name

        def build(self, logits: str, labels: str = "labels") -> str:
            ce = self.ce(logits, labels)
            teacher = onnxblock.blocks.InputLike(logits)(TEACHER)
            inv_t = self.const(1.0 / temperature)
            log_s = Node("LogSoftmax", axis=-1)(Node("Mul")(logits, inv_t))
            log_t = Node("LogSoftmax", axis=-1)(Node("Mul")(teacher, inv_t))
            per_row = Node("ReduceSum", keepdims=0)(Node("Mul")(Node("Exp")(log_t), Node("Sub")(log_t, log_s)),
                                                    self.const([1], np.int64))
            kl = Node("ReduceMean", keepdims=0)(per_row)
            return str(Node("Add")(Node("Mul")(ce, self.const(1.0 - alpha)),
                                   Node("Mul")(kl, self.const(alpha * temperature**2))))

    return KDLoss()
