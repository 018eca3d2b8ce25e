"""Measure the device trainer on one artifact directory, in a fresh process that imports only
what a board has (numpy + runtime), so peak RSS is the trainer's own. Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from runtime.trainer import TrainConfig, Trainer, peak_rss_mb


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--artifact", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    rss_before = peak_rss_mb()
    t = Trainer(a.artifact, threads=a.threads)
    rss_loaded = peak_rss_mb()
    n = a.batch * 8
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, *t.manifest.input_shape)).astype(np.float32)
    y = rng.integers(0, t.manifest.num_outputs, n).astype(np.int64)
    w = t.session.get_params()
    t.train(w, x, y, TrainConfig(steps=a.warmup, batch_size=a.batch, lr=0.01))
    cpu0 = time.process_time()
    r = t.train(w, x, y, TrainConfig(steps=a.steps, batch_size=a.batch, lr=0.01))
    cpu_s = time.process_time() - cpu0
    print(json.dumps({
        "step_ms_median": r.step_ms_median, "ort_ms_median": r.ort_ms_median,
        # Under a CFS quota most steps run unthrottled inside a burst; the mean is what the quota sets.
        "step_ms_mean": r.train_s * 1000.0 / r.steps,
        "cpu_ms_per_step": cpu_s * 1000.0 / r.steps,  # CPU the step cost; wall / CPU = the share it got
        "overhead_ms_median": r.step_ms_median - r.ort_ms_median,
        "peak_rss_mb": r.peak_rss_mb, "rss_imports_mb": rss_before, "rss_loaded_mb": rss_loaded,
        "params": t.layout.total, "flops_per_sample": t.manifest.flops_per_sample,
    }))


if __name__ == "__main__":
    main()
