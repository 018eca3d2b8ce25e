"""Graph variants: the loss a training artifact is generated with (its key includes it).

    ce              cross-entropy on the model's logits (every artifact so far)
    fd              cross-entropy, in a graph whose thinned groups scale their activations by
                    C_full / C_kept (inverted filter dropout, DISTREAL, methods.md §2.2)
    kd-<α>-<T>      FjORD-KD (methods.md §6.4): (1 − α)·CE(y, z) + α·T²·KL(softmax(t/T) ‖ softmax(z/T)),
                    with the teacher's logits t as a third training input `teacher` (the device
                    computes them with its p_max model on the same batch; no gradient flows to it)
    exits-<γ>-<T>   Co-S²P's multi-exit loss with cross-block knowledge transfer (methods.md §1.2):
                    CE(y, z_L) + Σ_{i<L} [CE(y, z_i) + g·γ·T²·KL(softmax(z_L/T) ‖ softmax(z_i/T))],
                    z_L the deepest exit the model holds (`logits`), z_i the shallower ones, g the
                    input `kd_gate` (shape (1,): 0 before `kd_from_round`, 1 from it, so one graph
                    serves both phases). As the authors' code: KL is PyTorch's `KLDivLoss()` with
                    its default 'mean' reduction (over batch × classes, not per sample), and the
                    teacher z_L is not detached (its gradient flows).
    mask-<λ1>       Co-S²P's mask-learning loss: CE(y, z) + λ1·|mask_kept − ρ|, with ρ the input
                    `keep_target` (shape (1,)) and `mask_kept` the graph's mean of the sampled mask
                    (models/builder.py: the scores are the trainable parameters).

The KD loss is written as an onnxblock so ORT derives its gradient graph like any other.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx

from runtime.backend import KD_GATE, KEEP_TARGET, TEACHER, kd_variant
from runtime.errors import ConfigError
from runtime.ort import training_artifacts_module

DEFAULT_VARIANT = "ce"
FILTER_DROPOUT = "fd"
__all__ = ["DEFAULT_VARIANT", "kd_variant", "loss_for", "parse_variant"]


def parse_variant(variant: str) -> tuple[str, float, float]:
    """("ce", 0, 1) (also for 'fd'), ("kd", α, T), ("exits", γ, T) or ("mask", λ1, 0); ConfigError
    naming the variant otherwise."""
    if variant in (DEFAULT_VARIANT, FILTER_DROPOUT):
        return "ce", 0.0, 1.0
    parts = variant.split("-")
    try:
        if len(parts) == 3 and parts[0] in ("kd", "exits"):
            alpha, temperature = float(parts[1]), float(parts[2])
            if 0.0 <= alpha <= (1.0 if parts[0] == "kd" else math.inf) and temperature > 0:
                return parts[0], alpha, temperature
        if len(parts) == 2 and parts[0] == "mask":
            lam = float(parts[1])
            if 0.0 <= lam < math.inf:
                return "mask", lam, 0.0
    except ValueError:
        pass
    raise ConfigError(f"unknown graph variant {variant!r}; use 'ce', 'fd', 'kd-<alpha in [0, 1]>-<temperature > 0>', "
                      "'exits-<gamma >= 0>-<temperature > 0>' or 'mask-<lambda1 >= 0>'")


def is_masked(variant: str) -> bool:
    """The variant whose graph is the mask-learning one (models/builder.py `masked`)."""
    return parse_variant(variant)[0] == "mask"


def loss_for(variant: str) -> Any:
    """The `loss` argument of ORT's generate_artifacts for `variant`."""
    art = training_artifacts_module()
    kind, alpha, temperature = parse_variant(variant)
    if kind == "ce":
        return art.LossType.CrossEntropyLoss
    if kind == "exits":
        return _exits_loss(alpha, temperature)
    if kind == "mask":
        return _mask_loss(alpha)
    return _kd_loss(alpha, temperature)


def _blocks() -> tuple[Any, Any, Any]:
    """onnxblock, a one-op block `Node(op, **attrs)(*inputs)`, and a base block with `const` and
    `scalar_input` (imported lazily: the training package must be registered without torch)."""
    training_artifacts_module()
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

    class LossBlock(onnxblock.Block):  # type: ignore[misc]
        def const(self, value: Any, dtype: Any = np.float32) -> str:
            name = str(_graph_utils.generate_graph_name("kd_const"))
            self.base.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value, dtype), name))
            return name

        def scalar_input(self, name: str) -> str:
            self.base.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1]))
            return name

    return onnxblock, Node, LossBlock


def _exits_loss(gamma: float, temperature: float) -> Any:
    onnxblock, Node, LossBlock = _blocks()

    class ExitsLoss(LossBlock):  # type: ignore[misc,valid-type]
        def build(self, logits: str, *exits: str) -> str:
            ce = onnxblock.loss.CrossEntropyLoss()
            total = ce(logits, "labels")
            if not exits:
                return str(total)
            gate = self.scalar_input(KD_GATE)
            inv_t = self.const(1.0 / temperature)
            log_t = Node("LogSoftmax", axis=-1)(Node("Mul")(logits, inv_t))
            p_t = Node("Exp")(log_t)
            # KLDivLoss 'mean': the mean over every element of p_t·(log p_t − log q_i).
            weight = Node("Mul")(gate, self.const(gamma * temperature**2))
            for z in exits:
                log_s = Node("LogSoftmax", axis=-1)(Node("Mul")(z, inv_t))
                kl = Node("ReduceMean", keepdims=0)(Node("Mul")(p_t, Node("Sub")(log_t, log_s)))
                term = Node("Add")(onnxblock.loss.CrossEntropyLoss()(z, "labels"), Node("Mul")(kl, weight))
                total = Node("Add")(total, term)
            return str(Node("ReduceSum", keepdims=0)(total))  # (1,) from the gate -> a scalar

    return ExitsLoss()


def _mask_loss(lambda1: float) -> Any:
    onnxblock, Node, LossBlock = _blocks()

    class MaskLoss(LossBlock):  # type: ignore[misc,valid-type]
        def build(self, logits: str, mask_kept: str) -> str:
            ce = onnxblock.loss.CrossEntropyLoss()(logits, "labels")
            target = self.scalar_input(KEEP_TARGET)
            penalty = Node("Mul")(Node("Abs")(Node("Sub")(mask_kept, target)), self.const(lambda1))
            return str(Node("ReduceSum", keepdims=0)(Node("Add")(ce, penalty)))

    return MaskLoss()


def _kd_loss(alpha: float, temperature: float) -> Any:
    onnxblock, Node, LossBlock = _blocks()

    class KDLoss(LossBlock):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.ce = onnxblock.loss.CrossEntropyLoss()

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
