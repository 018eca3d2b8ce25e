"""The PyTorch eager reference for the trainer section: the same network, weights and batches as
the device trainer's, trained by SGD at one thread. A reference only: torch is never a runtime
or test dependency, and this runs only when the bench finds it importable.

The network is the builder's own ONNX graph, interpreted op by op with `torch.nn.functional`
(the parent process dumps nodes and initializers, so this process imports neither onnx nor
onnxruntime and its peak RSS is torch's): same shapes, same initial weights, same loss (mean
cross-entropy), same update (plain SGD, lr 0.01). Prints one JSON line like trainer_probe.py."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from bench.trainer_data import LR, batches
from runtime.trainer import peak_rss_mb


def _run(nodes: list[dict[str, Any]], env: dict[str, Any]) -> Any:
    for n in nodes:
        op, a, ins = n["op"], n["attrs"], [env[i] for i in n["inputs"]]
        if op == "Conv":
            y = F.conv2d(ins[0], ins[1], ins[2] if len(ins) > 2 else None, stride=a["strides"], padding=a["pads"][:2])
        elif op == "Relu":
            y = F.relu(ins[0])
        elif op == "MaxPool":
            y = F.max_pool2d(ins[0], a["kernel_shape"], a["strides"])
        elif op == "Flatten":
            y = torch.flatten(ins[0], 1)
        elif op == "Gemm":  # the builder's dense layers: x @ W^T + b
            y = F.linear(ins[0], ins[1] if a.get("transB") else ins[1].t(), ins[2])
        elif op == "GlobalAveragePool":
            y = F.adaptive_avg_pool2d(ins[0], 1)
        elif op in ("Mul", "Add"):
            y = ins[0] * ins[1] if op == "Mul" else ins[0] + ins[1]
        elif op == "Identity":
            y = ins[0]
        elif op == "Unsqueeze":  # the ResNet's branch scale applied to its conv's weights
            y = ins[0].unsqueeze(int(ins[1][0]))
        elif op == "Reshape":
            y = ins[0].reshape(ins[1].tolist())
        elif op == "Constant":
            value = np.asarray(a["value"])
            y = torch.tensor(value if value.dtype.kind in "iu" else value.astype(np.float32))
        else:
            raise SystemExit(f"torch_probe: op {op} is not interpreted")
        env[n["outputs"][0]] = y
    return env["logits"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--graph", required=True, help="JSON of nodes, input shape, classes (trainer_bench writes it)")
    p.add_argument("--weights", required=True, help=".npz of the initial weights by name")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    spec = json.loads(Path(a.graph).read_text())
    with np.load(a.weights) as z:
        params = {k: torch.nn.Parameter(torch.from_numpy(z[k].copy())) for k in z.files}
    opt = torch.optim.SGD(list(params.values()), lr=LR)
    x, y = batches(tuple(spec["input_shape"]), spec["classes"], a.batch)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n = len(y)

    def step(bx: Any, by: Any) -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(_run(spec["nodes"], {"input": bx, **params}), by)
        loss.backward()
        opt.step()
        return float(loss.detach())

    losses = [step(xt[:a.batch], yt[:a.batch]) for _ in range(2)]
    order = np.random.default_rng(0).permutation(n)
    b = 0

    def run(steps: int) -> None:
        nonlocal b
        for _ in range(steps):
            idx = torch.from_numpy(order[b * a.batch:(b + 1) * a.batch])
            step(xt[idx], yt[idx])
            b = (b + 1) % (n // a.batch)

    run(a.warmup)
    cpu_ms = []
    for _ in range(a.rounds):
        c0 = time.process_time()
        run(a.steps)
        cpu_ms.append((time.process_time() - c0) * 1000.0 / a.steps)
    print(json.dumps({
        "cpu_ms_per_step": statistics.median(cpu_ms), "cpu_ms_per_step_rounds": [round(c, 4) for c in cpu_ms],
        "peak_rss_mb": peak_rss_mb(), "check_loss": losses,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
