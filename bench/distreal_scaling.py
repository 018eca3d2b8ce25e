"""DISTREAL's activation scaling on one non-IID device shard (not part of `make bench`; run by
hand: `python bench/distreal_scaling.py`). Fashion-MNIST, 3,000-image stratified subset, 20 %
held out, the rest split Dirichlet 0.5 over 4 devices; device 0's shard trains the CNN from the
initial model for 120 steps (batch 32) through the DISTREAL device half with one fixed vector,
resampled every batch. Per scaling of the thinned layers' activations (`ck`: C/k, inverted
dropout, what the `fd` artifacts do; `sqrt`: √(C/k); `none`) and learning rate: first, last and
largest loss, and the full (dense) model's accuracy on the held-out images; FAILED if the loss
became NaN. The non-`ck` scalings are built here only (monkeypatched), in caches of their own.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.artifacts as artifacts
from models.builder import build
from models.datasets import load_dataset, train_test_split
from models.partition import partition
from models.structure import full_structure
from runtime.errors import TrainerError
from runtime.methods import distreal as dm
from runtime.methods import spec
from runtime.ort import OrtSession
from runtime.protocol import Assignment
from runtime.trainer import TrainConfig, Trainer

GROUPS = {"conv1": 32, "conv2": 32, "conv3": 64, "conv4": 64}
VECTORS = (dict.fromkeys(GROUPS, 0.5), {"conv1": 0.25, "conv2": 0.625, "conv3": 0.5, "conv4": 0.625},
           dict.fromkeys(GROUPS, 0.25))
STANDARD = artifacts.dropout_scales


def _scales(mode: str) -> Any:
    def scales(structure: Any) -> dict[str, float]:
        s = STANDARD(structure)
        return {g: (math.sqrt(v) if mode == "sqrt" else 1.0 if mode == "none" else v) for g, v in s.items()}

    return scales


def run() -> dict[str, Any]:
    ds = load_dataset("fashion-mnist", n=3000, seed=0)
    train, held_out = train_test_split(ds, 0.2, seed=0)
    shard = partition(train.y, 4, "dirichlet", seed=0, alpha=0.5)[0]
    x, y = train.x[shard], train.y[shard]
    w0 = build(full_structure("cnn", (1, 28, 28), 10), seed=0).init
    rows = []
    with tempfile.TemporaryDirectory(prefix="distreal-scaling-") as tmp:
        for mode in ("ck", "sqrt", "none"):
            artifacts.dropout_scales = _scales(mode)
            for lr in (0.05, 0.02):
                for drop in VECTORS:
                    front: dict[str, Any] = {"format": 1, "model": "cnn", "groups": GROUPS,
                             "vectors": [{"drop": drop, "step_ms": 1.0, "score": 0.0}]}
                    texts = spec("distreal").artifact_profiles("dense", spec("distreal").params({"front": front}))
                    sets = artifacts.artifacts_for("cnn", (1, 28, 28), 10, texts, cache_dir=Path(tmp) / mode)
                    sessions = {t: OrtSession(sets[t].directory, threads=1) for t in texts}
                    extras = {"vectors": [{**front["vectors"][0], "artifact": 1}], "select": False}
                    method = dm.Device(Assignment("distreal", "dense", texts, extras), sessions.__getitem__,
                                       quota_cores=lambda: None)
                    trainer = Trainer.on_backend(method.primary, (1, 28, 28), 10)
                    row: dict[str, Any] = {"scaling": mode, "lr": lr, "vector": dm.vector_profile(drop)}
                    try:
                        r = trainer.train(w0, x, y, TrainConfig(steps=120, batch_size=32, lr=lr, seed=0), method=method)
                        row.update(loss_first=round(r.loss_per_step[0], 2), loss_last=round(r.loss_per_step[-1], 2),
                                   loss_max=round(max(r.loss_per_step), 2),
                                   accuracy=round(trainer.evaluate(r.weights, held_out.x, held_out.y).accuracy, 3))
                    except TrainerError as exc:
                        row["failed"] = str(exc)
                    rows.append(row)
                    print(row, flush=True)
    artifacts.dropout_scales = STANDARD
    return {"rows": rows}


if __name__ == "__main__":
    run()
