"""Measure the device trainer on one artifact directory, in a fresh process that imports only
what a board has (numpy + runtime), so peak RSS is the trainer's own. Prints one JSON line.

CPU per step is `time.process_time` (all threads of this process) over `--rounds` rounds of
`--steps` steps each, through `Trainer.train` as a device runs it; the median round counts.
`check_loss` is the loss of the first batch from the artifact's initial weights and then again
after one SGD step on it, for the bench's comparison with the PyTorch reference. With
`--profile`, ORT's profiler runs over a separate set of steps and the per-op kernel times of the
training run are reported, with the CPU of each session call (training run, optimizer, reset)."""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.trainer_data import LR, batches
from runtime.backend import INPUT, LABELS, loss_of
from runtime.trainer import TrainConfig, Trainer, peak_rss_mb


def check_losses(t: Trainer, x: Any, y: Any, batch: int) -> list[float]:
    feeds = {INPUT: x[:batch], LABELS: y[:batch]}
    t.session.set_lr(LR)  # type: ignore[attr-defined]
    return [loss_of(t.session.train_step(feeds)) for _ in range(2)]


def _profile_events(text: str) -> list[dict[str, Any]]:
    """The events of a profile file, one JSON object a line. The training, eval and optimizer
    sessions share the options, so sessions closed in the same second write to one file name,
    and their writes can interleave mid-line: a line that does not parse is skipped (a few of
    thousands of events) rather than failing the bench."""
    events = []
    for line in text.splitlines():
        line = line.strip().rstrip(",")
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def profile_ops(directory: str, threads: int, x: Any, y: Any, batch: int, steps: int) -> dict[str, Any]:
    """Per-op kernel time of the training run from ORT's profiler, and CPU per session call."""
    import onnxruntime

    from runtime.ort import training_api

    api = training_api()
    prefix = os.path.join(tempfile.mkdtemp(prefix="orchard-prof-"), "train")
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling, opts.profile_file_prefix = True, prefix
    d = Path(directory)
    state = api.CheckpointState.load_checkpoint(str(d / "checkpoint"))
    module = api.Module(str(d / "training_model.onnx"), state, str(d / "eval_model.onnx"), device="cpu",
                        session_options=opts)
    optimizer = api.Optimizer(str(d / "optimizer_model.onnx"), module)
    module.train()
    calls: dict[str, list[float]] = {"train_run": [], "optimizer_step": [], "lazy_reset_grad": []}
    bx, by = x[:batch], y[:batch]
    for _ in range(steps):
        c0 = time.process_time()
        module(bx, by)
        c1 = time.process_time()
        optimizer.step()
        c2 = time.process_time()
        module.lazy_reset_grad()
        c3 = time.process_time()
        for k, dt in zip(calls, (c1 - c0, c2 - c1, c3 - c2), strict=True):
            calls[k].append(dt * 1e3)
    del optimizer, module, state  # the profiles are written when the sessions close
    # Kernel times are wall time: a run preempted by other load stretches. Each node's median over
    # the runs, summed per op type, keeps one preempted run from taking the table.
    per_node: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for f in glob.glob(prefix + "*.json"):
        for e in _profile_events(Path(f).read_text()):
            if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
                per_node[(e["args"]["op_name"], e["name"])].append(int(e["dur"]))
        os.remove(f)
    os.rmdir(os.path.dirname(prefix))
    per_op: collections.Counter[str] = collections.Counter()
    for (op, _), durations in per_node.items():
        per_op[op] += statistics.median(durations)
    total = sum(per_op.values()) or 1
    return {
        "session_call_cpu_ms_median": {k: round(statistics.median(v), 4) for k, v in calls.items()},
        "kernel_us_per_step": round(total, 1),
        "top_ops": [{"op": op, "share": round(us / total, 3), "us_per_step": round(us, 1)}
                    for op, us in per_op.most_common(8)],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--artifact", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--profile", type=int, default=0, help="steps to profile (0: none)")
    a = p.parse_args()
    rss_before = peak_rss_mb()
    t = Trainer(a.artifact, threads=a.threads)
    rss_loaded = peak_rss_mb()
    x, y = batches(t.manifest.input_shape, t.manifest.num_outputs, a.batch)
    w = t.session.get_params()
    losses = check_losses(t, x, y, a.batch)
    t.train(w, x, y, TrainConfig(steps=a.warmup, batch_size=a.batch, lr=LR))
    cpu_ms, step_ms, wall_ms = [], [], []
    for _ in range(a.rounds):
        cpu0 = time.process_time()
        r = t.train(w, x, y, TrainConfig(steps=a.steps, batch_size=a.batch, lr=LR))
        cpu_ms.append((time.process_time() - cpu0) * 1000.0 / r.steps)
        step_ms.append(r.step_ms_median)
        wall_ms.append(r.train_s * 1000.0 / r.steps)
    out = {
        "cpu_ms_per_step": statistics.median(cpu_ms), "cpu_ms_per_step_rounds": [round(c, 4) for c in cpu_ms],
        "step_ms_median": statistics.median(step_ms), "ort_ms_median": r.ort_ms_median,
        # Under a CFS quota most steps run unthrottled inside a burst; the mean is what the quota sets.
        "step_ms_mean": statistics.median(wall_ms),
        "overhead_ms_median": r.step_ms_median - r.ort_ms_median,
        "peak_rss_mb": r.peak_rss_mb, "rss_imports_mb": rss_before, "rss_loaded_mb": rss_loaded,
        "params": t.layout.total, "flops_per_sample": t.manifest.flops_per_sample, "check_loss": losses,
        "torch_loaded": "torch" in sys.modules,
    }
    if a.profile:
        out["profile"] = profile_ops(a.artifact, a.threads, x, y, a.batch, a.profile)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
