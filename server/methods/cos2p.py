"""`cos2p`, server half (methods.md §1.3): a tier (keep ρ, depth ρ_d) device gets the depth-d
prefix of the global multi-exit model (every exit head it holds included: the authors' upload
filter drops heads through a string bug, `'exist_classifiers' + str(0.75 * 4)`; not here) and
uploads a masked delta as indices + values. `admit` checks those indices are a structured mask
of the device's depth (every coordinate of the kept units, ⌈ρ·C⌉ units per group, nothing past
its depth) and, once its mask is frozen (rounds >= mask_rounds), that they are the mask it
used before; the strategy then weighs each update by importance over staleness
(`server.weighting.cos2p_weights`) and applies W + Σ γ_i Δ_i (`masked_delta_merge`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from runtime.errors import ConfigError, RoundError
from runtime.layout import ParamLayout
from runtime.methods.cos2p import SPEC, parse_tier, tier_text
from runtime.protocol import Assignment
from runtime.submodel import CLASSES, IndexArray, Submodel, kept_channels
from server.admission import Payload
from server.aggregate import FloatArray
from server.events import UpdateReceived
from server.methods.base import ServerMethod
from server.policies import ModelOps, Strategy
from server.records import TaskRecord


def recover_mask(layout: ParamLayout, indices: IndexArray) -> dict[str, IndexArray]:
    """Per group, the units whose bias coordinates `indices` hold (every prunable unit has one)."""
    sent = np.zeros(layout.total, dtype=bool)
    sent[indices] = True
    out: dict[str, IndexArray] = {}
    for p in layout:
        if p.kind != "bias" or p.axes[0] is None or p.axes[0].group == CLASSES or p.axes[0].group in out:
            continue
        out[p.axes[0].group] = np.flatnonzero(sent[p.offset:p.end]).astype(np.int64)
    return out


def check_masked_indices(layout: ParamLayout, tensors: tuple[str, ...], indices: IndexArray, keep: float,
                         who: str) -> None:
    """RoundError naming the reason unless `indices` are exactly a ⌈keep·C⌉-per-group unit mask
    of the depth-cut model that holds `tensors`."""
    held = Submodel.of(layout, {}, tensors)
    if indices.size and int(indices.max()) >= held.indices.size:
        raise RoundError(f"{who}: index {int(indices.max())} lies past its depth (the first {held.indices.size} "
                         "coordinates)")
    cut = held.sub_layout
    mask = recover_mask(cut, indices)
    for group, units in mask.items():
        want = kept_channels(keep, cut.groups[group])
        if units.size != want:
            raise RoundError(f"{who}: mask of group {group!r} keeps {units.size} units, keep {keep:g} needs {want}")
    expected = Submodel.of(cut, mask).indices
    if expected.size != indices.size or not np.array_equal(expected, indices):
        raise RoundError(f"{who}: {indices.size} indices are not the coordinates of a unit mask "
                         f"({expected.size} expected for the units its biases name)")


class Server(ServerMethod):
    name = "cos2p"

    def __init__(self, params: Mapping[str, Any], model: ModelOps) -> None:
        super().__init__(SPEC.params(params), model)
        self._masks: dict[str, tuple[int, IndexArray]] = {}  # device -> (round, indices) of its last upload

    def index_profile(self, canonical: str) -> str:
        return self.spec.artifact_profiles(canonical, self.params)[0]

    def assign(self, profile: str, round_index: int) -> tuple[Assignment, IndexArray | None]:
        a, indices = super().assign(profile, round_index)
        return Assignment(a.method, a.profile, a.artifact_keys, {**a.extras, "round_index": round_index}), indices

    def model_rate(self, assignment: Assignment) -> float:
        return parse_tier(assignment.profile)[0]

    def admit(self, event: UpdateReceived, task: TaskRecord, base: FloatArray, strategy: Strategy,
              who: str) -> Payload:
        if event.update.kind != "delta":
            raise RoundError(f"{who}: cos2p takes a masked delta, got kind {event.update.kind!r}")
        keep = self.model_rate(task.assignment)
        layout = getattr(self.model, "layout", None)
        if event.indices is not None:
            indices = np.asarray(event.indices, dtype=np.int64)
        else:  # every coordinate of the task went (the wire sends fully covered tensors dense)
            indices = np.arange(self.model.n_params if task.indices is None else task.indices.size, dtype=np.int64)
        if isinstance(layout, ParamLayout):
            tensors = self._tensors(layout, task)
            check_masked_indices(layout, tensors, indices, keep, who)
        stored = self._masks.get(task.device_id)
        frozen_from = int(self.params["mask_rounds"])
        frozen = stored is not None and task.round >= frozen_from and stored[0] >= frozen_from - 1
        if frozen and stored is not None and not np.array_equal(stored[1], indices):
            differ = int(np.setxor1d(stored[1], indices).size)
            raise RoundError(f"{who}: indices do not match the device's stored mask ({differ} coordinates "
                             f"differ from its round-{stored[0]} upload)")
        payload = super().admit(event, task, base, strategy, who)
        self._masks[task.device_id] = (task.round, indices.copy())
        return payload

    def _tensors(self, layout: ParamLayout, task: TaskRecord) -> tuple[str, ...]:
        """The tensors of the task's depth: the global's leading ones its coordinates cover."""
        n = layout.total if task.indices is None else int(task.indices.size)
        return tuple(p.name for p in layout if p.end <= n)

    def smaller(self, profile: str, offered: tuple[str, ...]) -> list[str]:
        keep, depth = parse_tier(profile)
        found: dict[str, float] = {}
        for text in offered:
            try:
                k, d = parse_tier(text)
            except ConfigError:
                continue
            if k <= keep and d <= depth and (k, d) != (keep, depth):
                found[tier_text(k, d)] = k * k * d  # roughly the training cost: channels² × blocks
        return sorted(found, key=lambda name: -found[name])
