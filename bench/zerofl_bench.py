"""ZeroFL: what SWAT's masked forward costs on ONNX Runtime, what it would save with sparse
kernels (an ESTIMATE), and what the sparse uploads weigh on the wire (exact).

Per model (LeNet-5 on 28x28 Fashion-MNIST-shaped input, the comparison's model; the VGG-style
CNN on 32x32x3), batch 32, one thread, 60 timed steps after a warm-up, random data:
Each configuration runs 3 times, interleaved with the others, and the cheapest run is kept;
`step_vs_dense` is its ratio. Times are CPU time of this process (time.process_time, ORT at one
thread), so other tenants' load does not enter them, except `ort_ms` (wall, the trainer's median).
- `dense`: the plain step (no method), `task_ms_per_step` = CPU time of the whole run / steps;
- per sparsity s in (0.9, 0.95) and top-k `period` in (1, 10): `task_ms_per_step` (everything:
  top-k recompute, mask swap in and out, the ORT step), `ort_ms` (wall median inside ORT, the
  masked-weight step itself), `topk_ms_per_step` and `swap_ms_per_step` (CPU stopwatches around
  the method's top-k and swap, run totals / steps), and `train_flops_ratio_est`, the ESTIMATED training FLOPs
  vs dense if the kernels skipped the masked weights (models/methods/zerofl.py); ORT's do not.
- `upload_bytes`: the update frame (runtime/frames.encode_update) of each upload strategy at
  s x mask ratio r, next to the dense frame; the MQTT chunk header adds 22 bytes + the msg id.
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
import numpy.typing as npt

from models.artifacts import artifacts_for
from models.methods.zerofl import train_flops_per_sample
from runtime.backend import MutableFeeds, TrainingBackend
from runtime.frames import encode_update
from runtime.layout import FloatArray
from runtime.methods import spec
from runtime.methods.zerofl import UPLOADS, Device
from runtime.ort import OrtSession
from runtime.protocol import Assignment, Update
from runtime.trainer import TrainConfig, Trainer

CASES = (("lenet", (1, 28, 28), 10), ("cnn", (3, 32, 32), 10))
STEPS, WARMUP, BATCH, REPEATS = 60, 5, 32, 3


class CpuTimed(Device):
    """ZeroFL's device half with CPU stopwatches (its own report times wall, as a device sees it)."""

    topk_cpu_s = swap_cpu_s = 0.0

    def _recompute(self) -> None:
        c0 = time.process_time()
        super()._recompute()
        self.topk_cpu_s += time.process_time() - c0

    def before_step(self, step: int, feeds: MutableFeeds) -> TrainingBackend:
        c0, topk_before = time.process_time(), self.topk_cpu_s
        backend = super().before_step(step, feeds)
        self.swap_cpu_s += time.process_time() - c0 - (self.topk_cpu_s - topk_before)
        return backend

    def after_step(self, step: int, backend: TrainingBackend, loss: float) -> None:
        c0 = time.process_time()
        super().after_step(step, backend, loss)
        self.swap_cpu_s += time.process_time() - c0


def _timed(trainer: Trainer, w0: FloatArray, x: FloatArray, y: npt.NDArray[np.int64],
           method: CpuTimed | None) -> dict[str, Any]:
    cfg = TrainConfig(steps=STEPS, batch_size=BATCH, lr=0.01)
    trainer.train(w0, x, y, TrainConfig(steps=WARMUP, batch_size=BATCH, lr=0.01), method=method)
    if method is not None:
        method.topk_cpu_s = method.swap_cpu_s = 0.0
    c0 = time.process_time()
    r = trainer.train(w0, x, y, cfg, method=method)
    out = {"task_ms_per_step": round((time.process_time() - c0) * 1e3 / STEPS, 3),
           "ort_ms": round(r.ort_ms_median, 3)}
    if method is not None:
        out.update(topk_ms_per_step=round(method.topk_cpu_s * 1e3 / STEPS, 3),
                   swap_ms_per_step=round(method.swap_cpu_s * 1e3 / STEPS, 3))
    return out


def _upload_bytes(session: OrtSession, w0: FloatArray) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    trained = (w0 + rng.normal(0, 0.01, w0.size)).astype(np.float32)
    rows = []
    for s in (0.9, 0.95):
        for r in (0.0, 0.1, 0.2):
            for upload in UPLOADS:
                params = spec("zerofl").params({"sparsity": s, "mask_ratio": r, "upload": upload})
                method = Device(Assignment("zerofl", "dense", ("dense",), params), lambda key: session)
                body = method.pack(w0, trained, "weights")
                upd = Update("t1", "dev0", 0, 100, 1.0, 1.0, None, body.form, tensors=body.tensors(session.layout))
                rows.append({"sparsity": s, "mask_ratio": r, "upload": upload, "frame_bytes": len(encode_update(upd))})
    return rows


def _case(model: str, shape: tuple[int, ...], classes: int) -> dict[str, Any]:
    art = artifacts_for(model, shape, classes, ["dense"])["dense"]
    session = OrtSession(art.directory, threads=1)
    rng = np.random.default_rng(0)
    n = BATCH * 8
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int64)
    w0 = session.get_params()
    trainer = Trainer.on_backend(session, shape, classes)
    configs: dict[str, dict[str, Any] | None] = {"dense": None}
    for s in (0.9, 0.95):
        for period in (1, 10):
            configs[f"s{s:g}_period{period}"] = spec("zerofl").params({"sparsity": s, "period": period})
    # Interleaved repeats, the cheapest kept.
    best: dict[str, dict[str, Any]] = {}
    for _ in range(REPEATS):
        for name, params in configs.items():
            method = None if params is None else CpuTimed(Assignment("zerofl", "dense", ("dense",), params),
                                                          lambda key: session)
            row = _timed(trainer, w0, x, y, method)
            if name not in best or row["task_ms_per_step"] < best[name]["task_ms_per_step"]:
                best[name] = row
    out: dict[str, Any] = {"model": model, "params": session.layout.total, **best}
    print(f"  zerofl {model:<6} dense            step {best['dense']['task_ms_per_step']:7.3f} ms CPU"
          f" (ort {best['dense']['ort_ms']:6.3f})", flush=True)
    for name, params in configs.items():
        if params is None:
            continue
        row = best[name]
        row["train_flops_ratio_est"] = round(train_flops_per_sample(params, model, shape, classes)["ratio_est"], 4)
        row["step_vs_dense"] = round(row["task_ms_per_step"] / best["dense"]["task_ms_per_step"], 3)
        print(f"  zerofl {model:<6} {name:<16} step {row['task_ms_per_step']:7.3f} ms (ort {row['ort_ms']:6.3f},"
              f" top-k {row['topk_ms_per_step']:6.3f}, swap {row['swap_ms_per_step']:6.3f})"
              f" = x{row['step_vs_dense']:.2f} of dense; FLOPs est. x{row['train_flops_ratio_est']:.3f}", flush=True)
    out["upload_bytes"] = _upload_bytes(session, w0)
    return out


def run() -> dict[str, Any]:
    return {"rows": [_case(*case) for case in CASES]}


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
