"""A DISTREAL device's trainer, run as its own process inside a cgroup by
test_distreal_selfselect.py: it profiles each vector (its t̂ at the starting quota), then trains
one task against a deadline with self-selection on, writing `step vector` per mini-batch."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from runtime.methods import distreal as dm
from runtime.ort import OrtSession
from runtime.protocol import Assignment
from runtime.trainer import TrainConfig, Trainer


def main() -> int:
    cfg = json.loads(sys.argv[1])
    progress = Path(cfg["progress"])
    sessions = {k: OrtSession(d, threads=1) for k, d in cfg["dirs"].items()}
    keys, shape = cfg["keys"], tuple(cfg["input_shape"])
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(256, *shape)) * 0.1).astype(np.float32)  # timing, not learning: keep it tame
    y = rng.integers(0, 10, 256).astype(np.int64)
    vectors = cfg["vectors"]
    for i, v in enumerate(vectors):  # t̂(d): this device's own profile, at the quota it starts with
        alone = [{**v, "artifact": 0 if v["artifact"] == 0 else 1}]
        sub_keys = [keys[0]] + ([keys[v["artifact"]]] if v["artifact"] else [])
        method = dm.Device(Assignment("distreal", "dense", tuple(sub_keys), {"vectors": alone, "select": False}),
                           sessions.__getitem__)
        r = Trainer.on_backend(method.primary, shape, 10).train(
            None, x, y, TrainConfig(steps=20, batch_size=16, lr=1e-4, seed=i), method=method)
        # Throughput, not the median step: under a CFS quota a step's wall time is quantised to
        # periods, so a median of a few flips between one and two of them (as the method itself
        # measures: a ratio of sums).
        v["step_ms"] = r.train_s / r.steps * 1e3
    extras = {"vectors": vectors, "select": True, "recheck_every": 2, "resample_every": 1, "time_margin": 0.9}
    method = dm.Device(Assignment("distreal", "dense", tuple(keys), extras), sessions.__getitem__)
    budget_s = cfg["steps"] * vectors[0]["step_ms"] / 1e3 * cfg["deadline_factor"]
    method.deadline_at = time.monotonic() + budget_s
    original = method.before_step
    with progress.open("w") as out:

        def before(step: int, feeds: dict) -> object:
            backend = original(step, feeds)
            out.write(f"{step} {method.current}\n")
            out.flush()
            return backend

        method.before_step = before  # type: ignore[method-assign]
        Trainer.on_backend(method.primary, shape, 10).train(
            None, x, y, TrainConfig(steps=cfg["steps"], batch_size=16, lr=1e-4, seed=9), method=method)
    print(json.dumps({"report": method.report(), "step_ms": [v["step_ms"] for v in vectors],
                      "deadline_s": budget_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
