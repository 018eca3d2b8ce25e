"""Scoring each new global version: the served model, and every fixed submodel a board serves.

A width or class profile is a model a board serves on its own (HeteroFL's per-width accuracy),
so each is scored too, each version. Rolling windows move each round, and a graph variant
(`@kd-…`, `@fd`) is a training graph, not a model anyone serves: neither is scored. A
class-subset profile is scored on the samples of its classes, as its board serves it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from runtime.layout import FloatArray
from runtime.profile import parse_profile, split_variant
from runtime.trainer import EvalResult, Trainer
from server.methods.base import ServerMethod
from server.model import ServerModel, load_eval_data


class Scorer:
    def __init__(self, model: ServerModel, method: ServerMethod, eval_data: Path) -> None:
        self.model = model
        self.eval_x, self.eval_y = load_eval_data(eval_data)
        self.evaluator = Trainer(model.global_dir, threads=1)
        self.profile_evaluators = {
            name: Trainer(art.directory, threads=1, classes=parse_profile(name).classes)
            for name, art in sorted(model.profiles.items())
            if method.profile_slices_fixed and split_variant(name)[1] is None
            and not model.submodel(name, 0).is_full and parse_profile(name).window != "rolling"}

    def served(self, method: ServerMethod, global_flat: FloatArray) -> EvalResult:
        return self.evaluator.evaluate(method.served_weights(np.asarray(global_flat), self.model.layout),
                                       self.eval_x, self.eval_y)

    def profiles(self, global_flat: FloatArray) -> Iterator[tuple[str, EvalResult]]:
        flat = np.asarray(global_flat)
        for profile, evaluator in self.profile_evaluators.items():
            yield profile, evaluator.evaluate(self.model.submodel(profile, 0).extract(flat), self.eval_x, self.eval_y)
