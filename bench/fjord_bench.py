"""FjORD: what switching artifacts per batch costs (methods.md §6.4 trains a width drawn per
mini-batch; on ONNX Runtime each width is its own session, so a switch copies the nested slice
out of the p_max buffer into the width's session and its result back).

Per model (LeNet-5 on 8x8 digits, the VGG-style CNN on 32x32x3), P = {0.25, 0.5, 0.75, 1},
p_max = 1, batch 32, one thread, 60 timed steps after a warm-up:
All times are CPU time of this process (time.process_time; ORT at one thread), so other tenants'
load on a shared host does not enter them (wall-time medians were 9x the quiet figure at load 30).
- `plain_step_ms`: CPU ms per step of the full model with no method (the run's CPU / steps);
- per `resample_every` k in (1, 10): `step_ms` (CPU ms per step, swaps included),
  `swap_ms_median` (median CPU time of a step's switch: extract + set_params of the new width and
  get_params + scatter of the old one), `swaps`, and `swap_share` = Σ switch CPU / the run's CPU.
`k1_distill`: k = 1 with FjORD-KD (α 0.5, T 1): a switch step then also includes the teacher's
forward pass (the p_max model on the batch), which every step below p_max takes.
Measured only: nothing is asserted here.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from models.artifacts import artifacts_for
from runtime.backend import MutableFeeds, TrainingBackend, kd_variant
from runtime.methods.fjord import Device
from runtime.ort import OrtSession
from runtime.protocol import Assignment
from runtime.trainer import TrainConfig, Trainer

WIDTHS = [1.0, 0.75, 0.5, 0.25]
CASES = (("lenet", (1, 8, 8), 10), ("cnn", (3, 32, 32), 10))
STEPS, WARMUP, BATCH = 60, 5, 32


class TimedFjord(Device):
    """FjORD's device half with a stopwatch around the part that switches widths."""

    swap_ms: list[float]

    def before_step(self, step: int, feeds: MutableFeeds) -> TrainingBackend:
        loaded = self._loaded
        t0 = time.process_time()
        backend = super().before_step(step, feeds)
        if self._loaded != loaded or loaded is None:
            self.swap_ms.append((time.process_time() - t0) * 1e3)
        return backend


def _case(model: str, shape: tuple[int, ...], classes: int) -> dict[str, Any]:
    texts = ["dense" if w == 1.0 else f"width={w:g}" for w in WIDTHS]
    kd_texts = [texts[0], *(f"{t}@{kd_variant(0.5, 1.0)}" for t in texts[1:])]
    sets = artifacts_for(model, shape, classes, texts + kd_texts[1:])
    sessions = {sets[t].key: OrtSession(sets[t].directory, threads=1) for t in texts + kd_texts[1:]}
    keys = tuple(sets[t].key for t in texts)
    kd_keys = tuple(sets[t].key for t in kd_texts)
    rng = np.random.default_rng(0)
    n = BATCH * 8
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int64)
    primary = sessions[keys[0]]
    w0 = primary.get_params()
    trainer = Trainer.on_backend(primary, shape, classes)
    trainer.train(w0, x, y, TrainConfig(steps=WARMUP, batch_size=BATCH, lr=0.01))
    c0 = time.process_time()
    trainer.train(w0, x, y, TrainConfig(steps=STEPS, batch_size=BATCH, lr=0.01))
    plain_ms = (time.process_time() - c0) * 1e3 / STEPS
    out: dict[str, Any] = {"model": model, "params": primary.layout.total, "plain_step_ms": round(plain_ms, 3)}
    for k, distill in ((1, False), (10, False), (1, True)):
        extras = {"widths": WIDTHS, "resample_every": k, "distill": distill}
        method = TimedFjord(Assignment("fjord", "dense", kd_keys if distill else keys, extras), sessions.__getitem__)
        name = f"k{k}" + ("_distill" if distill else "")
        method.swap_ms = []
        trainer.train(w0, x, y, TrainConfig(steps=WARMUP, batch_size=BATCH, lr=0.01), method=method)
        method.swap_ms = []
        c0 = time.process_time()
        trainer.train(w0, x, y, TrainConfig(steps=STEPS, batch_size=BATCH, lr=0.01), method=method)
        total_ms = (time.process_time() - c0) * 1e3
        out[name] = {
            "step_ms": round(total_ms / STEPS, 3),
            "swap_ms_median": round(float(np.median(method.swap_ms)), 3) if method.swap_ms else 0.0,
            "swaps": len(method.swap_ms), "swap_share": round(sum(method.swap_ms) / total_ms, 4),
        }
        print(f"  fjord {model:<6} {name:<10} step {total_ms / STEPS:7.3f} ms CPU (plain {plain_ms:7.3f})"
              f"  switch {out[name]['swap_ms_median']:6.3f} ms x {len(method.swap_ms):2d}"
              f"  = {100 * out[name]['swap_share']:4.1f}% of the run", flush=True)
    return out


def run() -> dict[str, Any]:
    return {"rows": [_case(*case) for case in CASES]}


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
