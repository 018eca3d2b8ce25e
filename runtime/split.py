"""One part of a split model (MP-SL), on ONNX Runtime: forward, backward with input gradient, step.

The artifacts come from models/split.py: every part but the first has a trainable zero `probe`
added to its input, whose gradient is dL/d(input); every part but the last is trained on the loss
sum(out * grad), where `grad` is the gradient of its output received from downstream. ORT runs
forward and backward in one call, so `backward` reruns the forward on the stored input. The probe
is put back to zero after every step (SGD moved it), so a forward never sees a shifted input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.backend import INPUT, LABELS, LOGITS, LOSS
from runtime.errors import ArtifactError, ProtocolError
from runtime.layout import FloatArray

PROBE = "probe"
GRAD = "grad"


class PartPosition:
    """Where a part sits in the chain: the first has no probe, the last holds the loss. Shared by
    the artifact builder's `Part` (models/split.py) and the runner that trains it."""

    index: int  # 0 .. P-1
    count: int  # P

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


class PartRunner(PartPosition):
    """A part's ORT session; weights in and out exclude the probe."""

    def __init__(self, directory: Path | str, threads: int = 1) -> None:
        from runtime.ort import OrtSession  # lazy: tests of the protocol need no ORT

        self.session = OrtSession(directory, threads)
        raw = self.session.manifest.raw.get("split")
        if not isinstance(raw, dict):
            raise ArtifactError(f"artifact directory {directory}: not a split part (no 'split' in its manifest)")
        self.index = int(raw["part"])
        self.count = int(raw["parts"])
        self.batch = int(raw["batch"])
        self.in_shape: tuple[int, ...] = tuple(int(d) for d in raw["in_shape"])
        self.out_shape: tuple[int, ...] = tuple(int(d) for d in raw["out_shape"])
        self.weights_total = int(raw["weights"])
        self.full_offsets = [(int(a), int(b)) for a, b in raw["full_offsets"]]
        self.layers = tuple(str(n) for n in raw["layers"])
        self._probe = None if self.first else np.zeros((self.batch, *self.in_shape), np.float32)
        self._zero_grad = np.zeros((self.batch, *self.out_shape), np.float32)
        self._zero_labels = np.zeros(self.batch, np.int64)

    def load(self, weights: npt.NDArray[np.float32]) -> None:
        flat = np.asarray(weights, dtype=np.float32)
        if flat.shape != (self.weights_total,):
            raise ProtocolError(f"part {self.index} weights have shape {flat.shape}, expected ({self.weights_total},)")
        if self._probe is not None:
            flat = np.concatenate([flat, self._probe.reshape(-1)])
        self.session.set_params(flat)

    def weights(self) -> FloatArray:
        return self.session.get_params()[: self.weights_total].copy()

    def set_lr(self, lr: float) -> None:
        self.session.set_lr(lr)

    def check_batch(self, what: str, arr: npt.NDArray[Any], shape: tuple[int, ...]) -> None:
        want = (self.batch, *shape)
        if tuple(arr.shape) != want:
            raise ProtocolError(f"part {self.index}: {what} has shape {tuple(arr.shape)}, expected {want}")

    def _feeds(self, x: npt.NDArray[np.float32], grad: npt.NDArray[np.float32] | None,
               labels: npt.NDArray[np.int64] | None) -> dict[str, npt.NDArray[Any]]:
        feeds: dict[str, npt.NDArray[Any]] = {INPUT: np.ascontiguousarray(x, dtype=np.float32)}
        if self.last:
            feeds[LABELS] = self._zero_labels if labels is None else np.asarray(labels, dtype=np.int64)
        else:
            feeds[GRAD] = self._zero_grad if grad is None else np.ascontiguousarray(grad, dtype=np.float32)
        return feeds

    def forward(self, x: npt.NDArray[np.float32]) -> FloatArray:
        """The part's output on `x`, nothing updated."""
        self.check_batch("input", x, self.in_shape)
        out = self.session.eval_step(self._feeds(x, None, None))
        return np.asarray(out[LOGITS], dtype=np.float32)

    def backward(self, x: npt.NDArray[np.float32], grad_out: npt.NDArray[np.float32]) -> FloatArray | None:
        """Step on the injected gradient of the output; return dL/dx (None for the first part)."""
        if self.last:
            raise ArtifactError("the last part computes its own loss: use train_last")
        self.check_batch("input", x, self.in_shape)
        self.check_batch("gradient", grad_out, self.out_shape)
        self.session.train_step(self._feeds(x, grad_out, None))
        return self._input_grad()

    def train_last(self, x: npt.NDArray[np.float32],
                   labels: npt.NDArray[np.int64]) -> tuple[float, FloatArray, FloatArray]:
        """Loss, logits and dL/dx of the last part on (x, labels), after its step."""
        self.check_batch("input", x, self.in_shape)
        if tuple(np.shape(labels)) != (self.batch,):
            raise ProtocolError(f"part {self.index}: labels have shape {np.shape(labels)}, expected ({self.batch},)")
        out = self.session.train_step(self._feeds(x, None, labels))
        grad = self._input_grad()
        assert grad is not None
        return float(np.asarray(out[LOSS])), np.asarray(out.get(LOGITS, np.zeros(0)), np.float32), grad

    def _input_grad(self) -> FloatArray | None:
        if self._probe is None:
            return None
        grad = self.session.param_grad(PROBE)
        self.session.set_param(PROBE, self._probe)
        return grad


def fedavg(flats: list[npt.NDArray[np.float32]], counts: list[int]) -> FloatArray:
    """Sample-weighted average of flat weight buffers (methods.md §4.4): a compute node's per-owner
    copies of its part, or the owners' M_1 and M_P at the aggregator."""
    if not flats or len(flats) != len(counts) or sum(counts) <= 0:
        raise ProtocolError(f"fedavg needs matching buffers and positive counts, got {len(flats)} / {counts}")
    total = float(sum(counts))
    out = np.zeros(np.shape(flats[0]), dtype=np.float64)
    for i, flat in enumerate(flats):  # no zip(strict=): board code runs on Python 3.8
        out += np.asarray(flat, dtype=np.float64) * (counts[i] / total)
    return out.astype(np.float32)
