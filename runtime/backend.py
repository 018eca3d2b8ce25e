"""The training-backend protocol, and a numpy MLP backend for tests and method references.

A backend trains one model structure on named feeds and returns named outputs, so that later
graphs (multi-exit heads, extra losses, split parts) add names instead of positional arguments.
`runtime/ort.py` is the ONNX Runtime implementation; `NumpyMLP` below is an exact SGD MLP in
numpy (the trainer's reference test checks ORT against the same math), so device methods and
the trainer loop can be tested without ONNX Runtime.

Feeds: `input` (N, *input_shape) float32, `labels` (N,) int64, and `teacher` (N, classes)
float32 for a distillation graph. Outputs: `loss` (scalar, the batch mean), `logits` (N, classes)
from `eval_step`.
"""

from __future__ import annotations

from typing import Dict, Mapping, Protocol

import numpy as np
import numpy.typing as npt

from runtime.errors import LayoutError, TrainerError
from runtime.layout import FloatArray, ParamLayout

INPUT = "input"
LABELS = "labels"
TEACHER = "teacher"  # a distillation graph's extra input: the teacher's logits on the batch
LOSS = "loss"
LOGITS = "logits"

Feeds = Mapping[str, npt.NDArray[np.generic]]
MutableFeeds = Dict[str, npt.NDArray[np.generic]]
Outputs = Mapping[str, npt.NDArray[np.generic]]


class TrainingBackend(Protocol):
    layout: ParamLayout

    def train_step(self, feeds: Feeds) -> Outputs:
        """One forward/backward/update; outputs hold at least `loss`."""
        ...

    def eval_step(self, feeds: Feeds) -> Outputs:
        """Forward only; outputs hold `loss` and `logits`."""
        ...

    def get_params(self) -> FloatArray: ...

    def set_params(self, flat: npt.NDArray[np.float32]) -> None: ...

    def set_lr(self, lr: float) -> None: ...


def kd_variant(alpha: float, temperature: float) -> str:
    """The graph-variant name of a distillation loss (models/losses.py builds it)."""
    return f"kd-{alpha:g}-{temperature:g}"


def loss_of(outputs: Outputs) -> float:
    return float(np.asarray(outputs[LOSS]))


class NumpyMLP:
    """Dense ReLU layers `<name>.W` (out, in) / `<name>.b` in layout order, softmax cross-entropy,
    plain SGD, float64 inside. The layout must list W then b per layer (models/builder's mlp).
    `act_scale` multiplies a hidden layer's activations (after ReLU) by a constant, keyed by the
    layer's output group, as models/builder does for inverted filter dropout."""

    def __init__(self, layout: ParamLayout, lr: float = 0.1, act_scale: Mapping[str, float] | None = None) -> None:
        names = [p.name for p in layout.params]
        pairs = list(zip(names[::2], names[1::2]))
        if len(names) % 2 or any(not (w.endswith(".W") and b == w[:-2] + ".b") for w, b in pairs):
            raise LayoutError(f"NumpyMLP needs (W, b) pairs in layout order, got {names}")
        self.layout = layout
        self._layers = [(w[:-2]) for w in names[::2]]
        scale = dict(act_scale or {})
        out_groups = [getattr(layout.params[2 * i].axes[0], "group", None) for i in range(len(self._layers))]
        self._scale = [float(scale.get(g, 1.0)) if g is not None else 1.0 for g in out_groups]
        self._flat = np.zeros(layout.total, dtype=np.float32)
        self.lr = lr
        self.steps = 0

    def set_params(self, flat: npt.NDArray[np.float32]) -> None:
        self._flat = np.array(self.layout.check(flat), dtype=np.float32, copy=True)

    def get_params(self) -> FloatArray:
        return self._flat.copy()

    def set_lr(self, lr: float) -> None:
        self.lr = float(lr)

    def _forward(self, feeds: Feeds) -> tuple[dict[str, npt.NDArray[np.float64]], list[npt.NDArray[np.float64]],
                                              list[npt.NDArray[np.float64]], npt.NDArray[np.float64]]:
        w = {k: v.astype(np.float64) for k, v in self.layout.split(self._flat).items()}
        x = np.asarray(feeds[INPUT])
        acts = [x.reshape(len(x), -1).astype(np.float64)]
        pre: list[npt.NDArray[np.float64]] = []
        for i, name in enumerate(self._layers):
            z = acts[-1] @ w[f"{name}.W"].T + w[f"{name}.b"]
            pre.append(z)
            acts.append(z if i == len(self._layers) - 1 else np.maximum(z, 0.0) * self._scale[i])
        return w, acts, pre, acts[-1]

    @staticmethod
    def _softmax_ce(logits: npt.NDArray[np.float64], y: npt.NDArray[np.int64]) -> tuple[float, npt.NDArray[np.float64]]:
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        loss = float(-np.log(p[np.arange(len(y)), y]).mean())
        return loss, p

    def train_step(self, feeds: Feeds) -> Outputs:
        y = np.asarray(feeds[LABELS], dtype=np.int64)
        w, acts, pre, logits = self._forward(feeds)
        loss, p = self._softmax_ce(logits, y)
        if not np.isfinite(loss):
            raise TrainerError(f"numpy MLP loss became {loss}")
        d = p
        d[np.arange(len(y)), y] -= 1.0
        d /= len(y)
        grads: dict[str, npt.NDArray[np.float64]] = {}
        for i in range(len(self._layers) - 1, -1, -1):
            name = self._layers[i]
            grads[f"{name}.W"] = d.T @ acts[i]
            grads[f"{name}.b"] = d.sum(0)
            if i:
                d = (d @ w[f"{name}.W"]) * (pre[i - 1] > 0) * self._scale[i - 1]
        new = {k: (w[k] - self.lr * grads[k]).astype(np.float32) for k in w}
        self._flat = self.layout.join(new)
        self.steps += 1
        return {LOSS: np.asarray(loss, dtype=np.float32)}

    def eval_step(self, feeds: Feeds) -> Outputs:
        y = np.asarray(feeds[LABELS], dtype=np.int64)
        _, _, _, logits = self._forward(feeds)
        loss, _ = self._softmax_ce(logits, y)
        return {LOSS: np.asarray(loss, dtype=np.float32), LOGITS: logits.astype(np.float32)}
