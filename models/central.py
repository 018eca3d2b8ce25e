"""Central training through the device trainer: what `orchard train` runs.

It takes the same path a device does in a federation: build the full model's initial weights,
slice the profile's submodel out of them, generate (or reuse) that structure's artifacts, train
on the training split and evaluate on the held-out split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.artifacts import artifacts_for
from models.builder import build
from models.datasets import load_dataset, train_test_split
from models.structure import full_structure
from runtime.profile import parse_profile
from runtime.submodel import Submodel, index_map_for
from runtime.telemetry import threads_for_quota
from runtime.trainer import TrainConfig, Trainer


@dataclass(frozen=True)
class CentralRun:
    model: str
    dataset: str
    profile: str = "dense"
    steps: int = 300
    epochs: int = 0  # used when steps == 0
    batch_size: int = 32
    lr: float = 0.1
    seed: int = 0
    threads: int | None = None  # None: one per core of this host
    optimizer: str = "sgd"
    data_root: str | None = None
    test_fraction: float = 0.2
    cache_dir: Path | None = None
    samples: int | None = None  # a stratified subset, drawn as a campaign's [model] samples is


def train_central(run: CentralRun, progress: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    profile = parse_profile(run.profile)
    ds = load_dataset(run.dataset, run.data_root, seed=run.seed, n=run.samples)
    train, test = train_test_split(ds, run.test_fraction, seed=run.seed)
    full = full_structure(run.model, ds.input_shape, ds.num_classes)
    built = build(full, seed=run.seed)
    sub = Submodel.of(built.layout, index_map_for(profile, built.layout.groups))
    artifacts = artifacts_for(run.model, ds.input_shape, ds.num_classes, [profile.canonical()],
                              optimizer=run.optimizer, cache_dir=run.cache_dir)[profile.canonical()]
    threads = run.threads if run.threads is not None else threads_for_quota(None)
    trainer = Trainer(artifacts.directory, threads=threads, classes=profile.classes)
    cfg = TrainConfig(steps=run.steps, epochs=run.epochs, batch_size=run.batch_size, lr=run.lr, seed=run.seed)
    result = trainer.train(sub.extract(built.init), train.x, train.y, cfg, progress=progress)
    ev = trainer.evaluate(result.weights, test.x, test.y)
    losses = result.loss_per_step
    tail = losses[-10:]
    return {
        "model": run.model,
        "dataset": run.dataset,
        "profile": profile.canonical(),
        "params": sub.sub_layout.total,
        "params_full": built.layout.total,
        "flops_per_sample": trainer.manifest.flops_per_sample,
        "flops_per_sample_full": built.flops_per_sample,
        "steps": result.steps,
        "batch_size": run.batch_size,
        "lr": run.lr,
        "optimizer": run.optimizer,
        "seed": run.seed,
        "threads": threads,
        "samples": run.samples,
        "train_samples": result.n_samples,
        "eval_samples": ev.n_samples,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_last10_mean": float(np.mean(tail)),
        "eval_loss": ev.loss,
        "eval_accuracy": ev.accuracy,
        "step_ms_median": result.step_ms_median,
        "ort_ms_median": result.ort_ms_median,
        "train_s": result.train_s,
        "peak_rss_mb": result.peak_rss_mb,
        "artifact_key": artifacts.key,
        "artifact_dir": str(artifacts.directory),
    }
