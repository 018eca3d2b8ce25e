"""Local training on an in-memory shard, through a training backend (ONNX Runtime artifacts
on a board, `runtime.backend.NumpyMLP` in tests).

The trainer takes weights in (a flat buffer in the primary artifact's layout), trains for a
number of steps or epochs with seeded shuffling, and gives weights out with the figures a
device reports: loss per step, median step time, peak RSS. A device method
(`runtime.methods.base.DeviceMethod`) is called around every step and picks the backend each
step trains; without one the trainer's own backend trains every step. A class-subset model
(Chen & Qin) sees only the samples of its classes, with labels mapped to the model's rows.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from runtime.backend import EVAL_CONTROLS, EXIT_PREFIX, INPUT, LABELS, LOGITS, MutableFeeds, TrainingBackend, loss_of
from runtime.errors import ConfigError, TrainerError
from runtime.layout import FloatArray
from runtime.methods.base import DeviceMethod
from runtime.record import record


@record
class TrainConfig:
    steps: int = 0  # > 0: exactly this many optimizer steps, cycling through epochs
    epochs: int = 1  # used when steps == 0
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.epochs < 0 or (self.steps == 0 and self.epochs == 0):
            raise ConfigError(f"training needs steps > 0 or epochs > 0 (got steps={self.steps}, epochs={self.epochs})")
        if self.batch_size < 1:
            raise ConfigError(f"batch size {self.batch_size} must be at least 1")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ConfigError(f"learning rate {self.lr} must be a positive number")


@record
class TrainResult:
    weights: FloatArray
    steps: int
    n_samples: int
    loss_per_step: tuple[float, ...]
    step_ms_median: float
    ort_ms_median: float  # of which inside ONNX Runtime; the rest is batching overhead
    train_s: float
    peak_rss_mb: float
    cpu_s: float = 0.0  # CPU time of this process (all threads) over the steps: against train_s x quota it
    # says whether the cgroup delivered its quota


@record
class EvalResult:
    loss: float
    accuracy: float  # of `logits` (a multi-exit model's deepest exit)
    n_samples: int
    exit_accuracy: tuple[float, ...] = ()  # a multi-exit model's: exits 1, 2, ..., then `logits`


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far: VmHWM, the high-water mark of this
    process's own memory map. Not ru_maxrss: Linux carries that across exec from the parent's map
    at fork (a probe started by a 350 MB parent reported 350 MB), so it can be the parent's."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class Trainer:
    def __init__(self, directory: Path | str, threads: int = 1, classes: tuple[int, ...] | None = None) -> None:
        from runtime.ort import OrtSession  # here, so a numpy-backend trainer never loads ORT

        session = OrtSession(directory, threads=threads)
        self.manifest = session.manifest
        self._setup(session, session.manifest.input_shape, session.manifest.num_outputs, classes)

    @classmethod
    def on_backend(cls, backend: TrainingBackend, input_shape: tuple[int, ...], num_outputs: int,
                   classes: tuple[int, ...] | None = None) -> Trainer:
        """A trainer around any backend (the numpy MLP in tests)."""
        trainer = cls.__new__(cls)
        trainer._setup(backend, input_shape, num_outputs, classes)
        return trainer

    def _setup(self, backend: TrainingBackend, input_shape: tuple[int, ...], num_outputs: int,
               classes: tuple[int, ...] | None) -> None:
        self.session = backend
        self.layout = backend.layout
        self.input_shape = tuple(input_shape)
        self.num_outputs = num_outputs
        self._check_classes(classes)
        self.classes = classes

    def _check_classes(self, classes: tuple[int, ...] | None) -> None:
        if classes is not None and len(classes) != self.num_outputs:
            raise ConfigError(f"class subset of {len(classes)} classes does not fit a model with "
                              f"{self.num_outputs} outputs")

    def _select(self, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64],
                classes: tuple[int, ...] | None) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        """Samples this model can learn from, with labels mapped to its output rows."""
        expected = self.input_shape
        if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            raise TrainerError(f"input batch shape {tuple(x.shape)} does not match the model's (N, {expected})")
        if len(x) != len(y):
            raise TrainerError(f"{len(x)} inputs but {len(y)} labels")
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        if classes is None:
            if len(y) and (y.min() < 0 or y.max() >= self.num_outputs):
                raise TrainerError(
                    f"labels span [{y.min()}, {y.max()}] but the model has {self.num_outputs} outputs")
            return x, y
        lut = np.full(max(max(classes), int(y.max(initial=0))) + 1, -1, dtype=np.int64)
        lut[list(classes)] = np.arange(len(classes))
        mapped = lut[y]
        keep = mapped >= 0
        return x[keep], mapped[keep]

    def train(self, weights: FloatArray | None, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64],
              cfg: TrainConfig, progress: Callable[[int, int, float], None] | None = None,
              method: DeviceMethod | None = None) -> TrainResult:
        """Train from `weights` (None: keep the backend's). `progress(step, total, loss)` is called
        every 10 steps, for command-line progress. `method` (its primary backend must be this
        trainer's) picks each step's backend; its own random draws come from a stream of their
        own (seed, 1), so they do not move the batch order."""
        if method is None:
            method = DeviceMethod.plain(self.session)
        classes = method.label_classes if method.label_classes is not None else self.classes
        self._check_classes(classes)
        xs, ys = self._select(x, y, classes)
        n = len(ys)
        if n == 0:
            raise TrainerError("the shard has no samples of the model's classes")
        batches_per_epoch = -(-n // cfg.batch_size)
        total = cfg.steps if cfg.steps > 0 else cfg.epochs * batches_per_epoch
        method.total_steps = total
        method.start(weights, cfg.lr, np.random.default_rng([cfg.seed, 1]))
        rng = np.random.default_rng(cfg.seed)
        losses: list[float] = []
        step_ms: list[float] = []
        ort_ms: list[float] = []
        order = rng.permutation(n)
        t_start, cpu_start = time.perf_counter(), time.process_time()
        for step in range(total):
            t0 = time.perf_counter()
            b = step % batches_per_epoch
            if b == 0 and step > 0:
                order = rng.permutation(n)
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            bx, by = xs[idx], ys[idx]
            feeds: MutableFeeds = {INPUT: bx, LABELS: by}
            backend = method.before_step(step, feeds)
            t1 = time.perf_counter()
            loss = loss_of(backend.train_step(feeds))
            t2 = time.perf_counter()
            method.after_step(step, backend, loss)
            if not np.isfinite(loss):
                raise TrainerError(f"loss became {loss} at step {step} (lr {cfg.lr}); weights not returned")
            losses.append(loss)
            if progress is not None and (step % 10 == 9 or step == total - 1):
                progress(step + 1, total, loss)
            ort_ms.append((t2 - t1) * 1e3)
            step_ms.append((t2 - t0) * 1e3)
        train_s, cpu_s = time.perf_counter() - t_start, time.process_time() - cpu_start
        return TrainResult(
            weights=method.trained(),
            steps=total,
            n_samples=n,
            loss_per_step=tuple(losses),
            step_ms_median=float(np.median(step_ms)),
            ort_ms_median=float(np.median(ort_ms)),
            train_s=train_s,
            peak_rss_mb=peak_rss_mb(),
            cpu_s=cpu_s,
        )

    def evaluate(self, weights: FloatArray | None, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64],
                 batch_size: int = 256) -> EvalResult:
        xs, ys = self._select(x, y, self.classes)
        if len(ys) == 0:
            raise TrainerError("the evaluation set has no samples of the model's classes")
        if weights is not None:
            self.session.set_params(weights)
        loss_sum, correct = 0.0, 0
        exits: dict[str, int] = {}
        for i in range(0, len(ys), batch_size):
            bx, by = xs[i : i + batch_size], ys[i : i + batch_size]
            out = self.session.eval_step({INPUT: bx, LABELS: by, **EVAL_CONTROLS})
            loss, logits = loss_of(out), np.asarray(out[LOGITS])
            loss_sum += loss * len(by)
            correct += int(np.sum(np.argmax(logits, axis=1) == by))
            for name in out:
                if name.startswith(EXIT_PREFIX):
                    exits[name] = exits.get(name, 0) + int(np.sum(np.argmax(np.asarray(out[name]), axis=1) == by))
        per_exit = tuple(exits[k] / len(ys) for k in sorted(exits, key=lambda k: int(k[len(EXIT_PREFIX):])))
        return EvalResult(loss=loss_sum / len(ys), accuracy=correct / len(ys), n_samples=len(ys),
                          exit_accuracy=(*per_exit, correct / len(ys)) if per_exit else ())
