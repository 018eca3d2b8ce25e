"""`make bench` trainer section: the device trainer's CPU per step against the host's fp32 GEMM
rate and against PyTorch eager on the same network, weights and batches.

- `gemm.kernels_us`: single ORT kernels on one activation of the CNN at width 0.25, CPU us;
  `gemm.alternatives_us`: the forms measured against the rewrites and not taken
  (bench/trainer_kernels.py).
- `gemm`: fp32 1024x1024x1024 GEMM at one thread, numpy/OpenBLAS `np.dot` and ONNX Runtime's own
  MatMul (an inference session, intra-op 1), in a fresh process with BLAS pools sized to 1.
  `ceiling_gflops` is the larger: the rate a training step's FLOPs are compared with.
- `rows`: per model, width and thread count, one fresh trainer process (bench/trainer_probe.py)
  and, at one thread where torch is importable, one PyTorch process (bench/torch_probe.py), run
  back to back per point; for the CNN and the ResNet three such pairs, interleaved, and the run
  with the median CPU per step counts. FLOPs per step = 3 x forward FLOPs (2 x MACs of the conv and dense
  layers, the manifest's `flops_per_sample`) x batch: the usual convention that a backward pass
  costs twice a forward; pooling, activations, loss and the update are not counted.
- `profile`: per point at one thread, ORT's profiler over 20 training runs: the top ops' share
  of kernel time, and the median CPU of each session call (training run, optimizer, reset).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDTHS = (1.0, 0.75, 0.5, 0.25)
# (model, input shape, classes, batch, widths, thread counts, trainer/torch pairs at one thread).
# Where the two are within ~10 % of each other (the CNN, the ResNet), one back-to-back pair moves
# by as much on a loaded host, so three interleaved pairs run and the medians count.
CASES: tuple[tuple[str, tuple[int, ...], int, int, tuple[float, ...], tuple[int, ...], int], ...] = (
    ("cnn", (3, 32, 32), 10, 32, WIDTHS, (1, 2), 3),
    ("lenet", (1, 8, 8), 10, 32, WIDTHS, (1, 2), 1),
    ("mlp", (1, 8, 8), 10, 32, (1.0, 0.25), (1,), 1),
    ("resnet", (3, 32, 32), 10, 32, (1.0, 0.25), (1,), 3),
)
GEMM_N = 1024
SINGLE_THREAD_ENV = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def gemm_probe(reps: int = 15) -> dict[str, Any]:
    """In this (fresh, single-thread) process: median and best CPU GFLOP/s of both GEMMs."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((GEMM_N, GEMM_N), dtype=np.float32) for _ in range(2))
    flop = 2.0 * GEMM_N**3

    def rates(fn: Any) -> dict[str, float]:
        fn()
        times = []
        for _ in range(reps):
            c0 = time.process_time()
            fn()
            times.append(time.process_time() - c0)
        return {"gflops_median": round(flop / statistics.median(times) / 1e9, 1),
                "gflops_best": round(flop / min(times) / 1e9, 1)}

    numpy_rate = rates(lambda: np.dot(a, b))
    from onnx import TensorProto, helper

    from runtime.ort import onnxruntime

    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [GEMM_N, GEMM_N]) for n in "ab"],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [GEMM_N, GEMM_N])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    sess = onnxruntime.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ort_rate = rates(lambda: sess.run(None, {"a": a, "b": b}))
    from bench.trainer_kernels import alternative_costs, kernel_costs

    return {"n": GEMM_N, "numpy": numpy_rate, "ort_matmul": ort_rate, "kernels_us": kernel_costs(reps),
            "alternatives_us": alternative_costs(reps)}


def _gemm() -> dict[str, Any]:
    env = {**os.environ, **SINGLE_THREAD_ENV}
    proc = subprocess.run([sys.executable, str(Path(__file__)), "--gemm"], capture_output=True, text=True,
                          check=True, env=env)
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    ceiling = max(out["numpy"]["gflops_median"], out["ort_matmul"]["gflops_median"])
    out["ceiling_gflops"] = ceiling
    out["ceiling"] = "numpy" if ceiling == out["numpy"]["gflops_median"] else "ort_matmul"
    return out


def _torch_spec(structure: Any, workdir: Path) -> tuple[Path, Path]:
    """The builder's graph as JSON nodes and its initial weights as .npz, for torch_probe.py."""
    import numpy as np
    from onnx import helper, numpy_helper

    from models.builder import build

    built = build(structure)
    nodes = []
    for n in built.model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if "value" in attrs:
            attrs["value"] = numpy_helper.to_array(attrs["value"]).tolist()
        nodes.append({"op": n.op_type, "inputs": list(n.input), "outputs": list(n.output), "attrs": attrs})
    graph, weights = workdir / f"{structure.key({})}.json", workdir / f"{structure.key({})}.npz"
    graph.write_text(json.dumps({"nodes": nodes, "input_shape": list(structure.input_shape),
                                 "classes": structure.num_outputs}))
    np.savez(weights, **{t.name: numpy_helper.to_array(t) for t in built.model.graph.initializer})
    return graph, weights


def _probe(args: list[str], threads: int) -> dict[str, Any]:
    env = {**os.environ, **{k: str(threads) for k in SINGLE_THREAD_ENV}}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} exited {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median CPU per step (the lower middle of an even count), with every run's
    figure in `pairs` and the first run's profile (only the first one profiles)."""
    ranked = sorted(runs, key=lambda r: r["cpu_ms_per_step"])
    out = {**ranked[(len(ranked) - 1) // 2], "pairs": [round(r["cpu_ms_per_step"], 4) for r in runs]}
    if "profile" in runs[0]:
        out["profile"] = runs[0]["profile"]
    return out


def run(steps: int = 20, rounds: int = 3, profile_steps: int = 20, models: tuple[str, ...] = ()) -> dict[str, Any]:
    """The section; `models` limits it to those models' points (all when empty)."""
    from models.artifacts import ensure_artifacts
    from models.builder import build
    from models.structure import full_structure, sub_structure
    from runtime.profile import Profile
    from runtime.submodel import index_map_for

    gemm = _gemm()
    ceiling = gemm["ceiling_gflops"]
    print(f"  gemm {GEMM_N}^3 1 thread: numpy {gemm['numpy']['gflops_median']} GFLOP/s, ORT MatMul "
          f"{gemm['ort_matmul']['gflops_median']} GFLOP/s (ceiling: {gemm['ceiling']})", flush=True)
    has_torch = importlib.util.find_spec("torch") is not None
    rows, profiles = [], []
    workdir = Path(tempfile.mkdtemp(prefix="orchard-trainer-bench-"))
    for model, shape, classes, batch, widths, thread_counts, pairs in CASES:
        if models and model not in models:
            continue
        full = full_structure(model, shape, classes)
        groups = build(full).layout.groups
        for threads in thread_counts:
            base: dict[str, Any] | None = None
            for width in widths:
                structure = sub_structure(full, index_map_for(Profile(width=width), groups))
                directory = ensure_artifacts(structure).directory
                common = ["--threads", str(threads), "--steps", str(steps), "--rounds", str(rounds),
                          "--batch", str(batch)]
                profile = ["--profile", str(profile_steps)] if threads == 1 and profile_steps else []
                load = os.getloadavg()[0]
                with_torch = has_torch and threads == 1
                if with_torch:
                    graph, weights = _torch_spec(structure, workdir)
                trainer_runs, torch_runs = [], []
                for i in range(pairs if with_torch else 1):
                    trainer_runs.append(_probe([str(ROOT / "bench" / "trainer_probe.py"), "--artifact", str(directory),
                                                *common, *(profile if i == 0 else [])], threads))
                    if with_torch:
                        torch_runs.append(_probe([str(ROOT / "bench" / "torch_probe.py"), "--graph", str(graph),
                                                  "--weights", str(weights), *common], threads))
                r = _median_run(trainer_runs)
                t = _median_run(torch_runs) if torch_runs else None
                base = base or r
                step_flops = 3 * r["flops_per_sample"] * batch
                gflops = step_flops / (r["cpu_ms_per_step"] * 1e-3) / 1e9
                flops_ratio = base["flops_per_sample"] / r["flops_per_sample"]
                speedup = base["cpu_ms_per_step"] / r["cpu_ms_per_step"]
                row: dict[str, Any] = {
                    "model": model, "input_shape": list(shape), "batch": batch, "threads": threads, "width": width,
                    "params": r["params"], "flops_per_sample": r["flops_per_sample"], "step_flops": step_flops,
                    "cpu_ms_per_step": round(r["cpu_ms_per_step"], 4),
                    "cpu_ms_per_step_rounds": r["cpu_ms_per_step_rounds"], "cpu_ms_per_step_pairs": r["pairs"],
                    "step_ms_median": round(r["step_ms_median"], 4),
                    "overhead_ms_median": round(r["overhead_ms_median"], 4),
                    "gflops": round(gflops, 2), "share_of_gemm": round(gflops / ceiling, 3),
                    "peak_rss_mb": round(r["peak_rss_mb"], 1),
                    "flops_speedup": round(flops_ratio, 2), "measured_speedup": round(speedup, 2),
                    "fraction_of_flops_speedup": round(speedup / flops_ratio, 3),
                    "check_loss": r["check_loss"], "loadavg_1m": round(load, 2),
                }
                if t is not None:
                    tg = step_flops / (t["cpu_ms_per_step"] * 1e-3) / 1e9
                    row.update({
                        "torch_cpu_ms_per_step": round(t["cpu_ms_per_step"], 4),
                        "torch_cpu_ms_per_step_rounds": t["cpu_ms_per_step_rounds"],
                        "torch_cpu_ms_per_step_pairs": t["pairs"],
                        "torch_gflops": round(tg, 2), "torch_share_of_gemm": round(tg / ceiling, 3),
                        "cpu_vs_torch": round(r["cpu_ms_per_step"] / t["cpu_ms_per_step"], 3),
                        "torch_peak_rss_mb": round(t["peak_rss_mb"], 1),
                        "rss_vs_torch": round(r["peak_rss_mb"] / t["peak_rss_mb"], 3),
                        "torch_check_loss": t["check_loss"],
                        "check_loss_max_abs_diff": max(
                            abs(p - q) for p, q in zip(r["check_loss"], t["check_loss"], strict=True)),
                    })
                rows.append(row)
                if "profile" in r:
                    profiles.append({"model": model, "width": width, "threads": threads, **r["profile"]})
                vs = (f"  torch {t['cpu_ms_per_step']:8.3f} ms ({row['cpu_vs_torch']:.2f}x, share "
                      f"{row['torch_share_of_gemm']:.2f}, loss diff {row['check_loss_max_abs_diff']:.1e})"
                      if t is not None else "")
                print(f"  trainer {model:<6} threads={threads} width={width:<5} CPU {r['cpu_ms_per_step']:8.3f} ms/step"
                      f"  share {row['share_of_gemm']:.2f}  speed-up {speedup:5.2f} of {flops_ratio:5.2f}"
                      f"  RSS {r['peak_rss_mb']:.0f} MB{vs}  load {load:.1f}", flush=True)
    return {"gemm": gemm, "flops_convention": "3 x forward (2 x MAC of conv + dense) x batch", "torch": has_torch,
            "rows": rows, "profile": profiles}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--gemm", action="store_true", help="run the GEMM probe in this process (single-thread env)")
    p.add_argument("--models", nargs="*", default=[], help="only these models' points (default: all)")
    a = p.parse_args()
    if a.gemm:
        print(json.dumps(gemm_probe()))
    else:
        print(json.dumps(run(models=tuple(a.models)), indent=1))
