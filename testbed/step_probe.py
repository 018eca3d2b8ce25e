"""Time the reference training step (and a large GEMM) in a process of its own; prints one
JSON line. Run by `testbed.calibrate` with its thread-pool variables already set, so nothing but
numpy and the device runtime (what a board has) is loaded here. With --wait it loads and warms
up, prints "ready" and waits for a line on stdin: the caller moves it into a cgroup meanwhile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from runtime.trainer import TrainConfig, Trainer

GEMM_N = 1024
BATCH = 32  # testbed.calibrate.REFERENCE_BATCH; not imported, to keep this process lean


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m testbed.step_probe", description=__doc__)
    p.add_argument("--artifact", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--gemm-reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--pin", action="store_true", help="run on one CPU only")
    p.add_argument("--wait", action="store_true", help="after warm-up, print 'ready' and wait for a line")
    a = p.parse_args(argv)
    if a.pin:  # one core, so the scheduler cannot migrate the step between caches
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    gflops = 0.0
    if a.gemm_reps > 0:
        rng = np.random.default_rng(0)
        x, y = (rng.standard_normal((GEMM_N, GEMM_N), dtype=np.float32) for _ in range(2))
        np.dot(x, y)
        best = min(_timed(lambda: np.dot(x, y)) for _ in range(a.gemm_reps))
        gflops = 2.0 * GEMM_N**3 / best / 1e9  # best, not median: interference only slows it
    trainer = Trainer(a.artifact, threads=a.threads)
    rng = np.random.default_rng(1)
    n = BATCH * 8
    data = rng.standard_normal((n, *trainer.manifest.input_shape), dtype=np.float32)
    labels = rng.integers(0, trainer.manifest.num_outputs, n).astype(np.int64)
    cfg = TrainConfig(steps=a.warmup, batch_size=BATCH, lr=0.01)
    trainer.train(None, data, labels, cfg)
    if a.wait:
        print("ready", flush=True)
        sys.stdin.readline()
    results, round_cpu_s = [], []
    for _ in range(a.rounds):
        cpu0 = time.process_time()  # every thread of this process, so ORT's pool too
        results.append(trainer.train(None, data, labels, dataclasses.replace(cfg, steps=a.steps)))
        round_cpu_s.append(time.process_time() - cpu0)
    cpu_ms_per_step = sum(round_cpu_s) * 1e3 / (a.steps * a.rounds)
    print(json.dumps({"step_ms_median": min(r.step_ms_median for r in results),
                      "step_ms_mean": sum(r.train_s for r in results) * 1e3 / (a.steps * a.rounds),
                      "gemm_gflops": gflops, "flops_per_sample": trainer.manifest.flops_per_sample,
                      "threads": a.threads, "cpu_ms_per_step": cpu_ms_per_step,
                      # CPU time does not grow while other work holds the core, wall time does
                      "cpu_ms_per_step_best": min(round_cpu_s) * 1e3 / a.steps}), flush=True)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
