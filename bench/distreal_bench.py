"""DISTREAL on the device trainer: for every vector on the committed front
(campaigns/fronts/cnn-rpi4b-4gb.json, the CNN on 28x28 Fashion-MNIST), ONNX Runtime with one
thread, batch 32, 40 timed steps after a warm-up, in CPU time (wall time moves with other load):
- `step_cpu_ms`: per step, a fresh random filter subset every batch (resample_every = 1), so the
  copy into the thinned graph and the scatter back are in it; `step_cpu_ms_k10`: a new subset
  every 10 batches; `switch_ms` = their difference per batch, the price of per-batch sampling;
- `flops_ratio`: forward FLOPs of the thinned graph over the dense one, and
  `time_ratio` = step_cpu_ms / the dense vector's: what the FLOPs saving buys here;
- `board_step_ms`: step_cpu_ms × the front's host→board factor (what a device's t̂ would be).
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
from models.builder import build
from models.structure import full_structure, sub_structure
from runtime.backend import MutableFeeds, TrainingBackend
from runtime.methods import distreal as dm
from runtime.methods import spec
from runtime.ort import OrtSession
from runtime.profile import parse_profile
from runtime.protocol import Assignment
from runtime.submodel import index_map_for
from runtime.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
FRONT = ROOT / "campaigns" / "fronts" / "cnn-rpi4b-4gb.json"
STEPS, WARMUP, BATCH = 40, 4, 32


class CpuTimed(dm.Device):
    cpu_ms: list[float]
    _cpu_last: float | None = None

    def before_step(self, step: int, feeds: MutableFeeds) -> TrainingBackend:
        now = time.process_time()
        if self._cpu_last is not None:
            self.cpu_ms.append((now - self._cpu_last) * 1e3)
        self._cpu_last = now
        return super().before_step(step, feeds)


def _cpu_step_ms(sessions: dict[str, OrtSession], texts: tuple[str, ...], vector: dict[str, Any], k: int,
                 x: Any, y: Any, w0: Any) -> float:
    extras = {"vectors": [vector], "select": False, "resample_every": k}
    method = CpuTimed(Assignment("distreal", "dense", texts, extras), sessions.__getitem__, quota_cores=lambda: None)
    trainer = Trainer.on_backend(method.primary, (1, 28, 28), 10)
    method.cpu_ms = []
    trainer.train(w0, x, y, TrainConfig(steps=WARMUP, batch_size=BATCH, lr=0.01), method=method)
    method.cpu_ms, method._cpu_last = [], None
    trainer.train(w0, x, y, TrainConfig(steps=STEPS + 1, batch_size=BATCH, lr=0.01), method=method)
    return float(np.mean(method.cpu_ms))  # the mean: a switch every 10th step must count once in ten


def run() -> dict[str, Any]:
    front = dm.load_front(str(FRONT))
    full = full_structure(front["model"], tuple(front["input_shape"]), front["num_classes"])
    dense_flops = build(full).flops_per_sample
    rng = np.random.default_rng(0)
    x = rng.random((512, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 512).astype(np.int64)
    w0 = build(full).init
    to_board = json.loads(FRONT.read_text()).get("search", {}).get("to_board")  # the search's own record
    measured = []
    # The dense model first, as the reference every ratio is taken against (it is on the front too).
    for v in [{"drop": {}, "step_ms": 1.0, "score": 1.0}, *front["vectors"]]:
        params = spec("distreal").params({"front": {**front, "vectors": [v]}})
        texts = spec("distreal").artifact_profiles("dense", params)
        sets = artifacts_for(front["model"], tuple(front["input_shape"]), front["num_classes"], texts)
        sessions = {t: OrtSession(sets[t].directory, threads=1) for t in texts}
        vector = {**v, "artifact": len(texts) - 1}
        k1 = _cpu_step_ms(sessions, texts, vector, 1, x, y, w0)
        k10 = _cpu_step_ms(sessions, texts, vector, 10, x, y, w0)
        profile = dm.vector_profile(v["drop"])
        flops = build(sub_structure(full, index_map_for(parse_profile(profile), full.channels))).flops_per_sample
        measured.append({"vector": profile, "flops_ratio": round(flops / dense_flops, 3), "step_cpu_ms": round(k1, 2),
                         "step_cpu_ms_k10": round(k10, 2), "switch_ms": round(k1 - k10, 2),
                         "board_step_ms": round(k1 * to_board, 1) if to_board else None,
                         "front_step_ms": v["step_ms"], "front_score": v["score"]})
    reference, rows = measured[0], measured[1:]
    for r in rows:
        r["time_ratio"] = round(r["step_cpu_ms"] / reference["step_cpu_ms"], 3)
        print(f"  distreal {r['vector']:<52} FLOPs {r['flops_ratio']:5.3f}  step {r['step_cpu_ms']:6.2f} ms CPU "
              f"(x{r['time_ratio']:.3f})  every 10: {r['step_cpu_ms_k10']:6.2f}  switch {r['switch_ms']:5.2f} ms",
              flush=True)
    return {"front": str(FRONT.relative_to(ROOT)), "dense_step_cpu_ms": reference["step_cpu_ms"], "rows": rows}


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
