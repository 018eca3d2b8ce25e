"""Chen & Qin's sub-models and harvest (methods.md §3.3, §3.5): pure numpy functions.

- `relevant_sets`: filter f of layer l serves class c if it is in the top `m` of column c of the
  layer's relevance (m = ⌈q·C_l⌉, the top-q share).
- `select_channels`: a device's filters in one layer are the union over its classes. The
  artifact fixes how many filters a layer holds (the device's budget: its profile's width), so
  when the union is larger the device's threshold is raised (m lowered) until it fits, and when
  it is smaller the free places go to the filters most relevant to any of its classes (they are
  trained, but harvested only where they serve one of its classes).
- `harvest_weights`: per coordinate of a device's sub-model, α = the device's sample count of
  the classes the coordinate serves: a filter's parameters serve the classes the filter is
  relevant to (within the device's own threshold), a classifier row serves its class.
  Coordinates of a parameter whose first axis follows no group (none in the builder's models)
  serve all of the device's classes.
- `harvest_merge`: `w_p = Σ_{k∋p} α_{k,p} w_{k,p} / Σ_{k∋p} α_{k,p}`; parameters no device holds
  (or holds with α = 0) keep their value. That is `per_element_average` with per-coordinate
  weights, which the engine's per-element merge applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from runtime.errors import ConfigError
from runtime.layout import ParamLayout
from runtime.submodel import CLASSES, Submodel, kept_channels
from server.aggregate import FloatArray, IndexArray, UpdateContribution, per_element_average

BoolArray = npt.NDArray[np.bool_]


def top_m(scores: npt.NDArray[np.float32], m: int) -> BoolArray:
    """(C, K) -> (C, K) mask: per class column, its `m` highest-scoring filters (ties by index)."""
    c = scores.shape[0]
    order = np.argsort(-scores, axis=0, kind="stable")[:min(m, c)]
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=0)
    return mask


@dataclass(frozen=True)
class LayerChoice:
    channels: IndexArray  # strictly increasing filter indices the device holds
    serves: BoolArray  # (len(channels), len(classes)): which of its classes each held filter serves
    threshold: int  # the m the device ended with (⌈q·C⌉ unless its budget raised the threshold)


def select_channels(scores: npt.NDArray[np.float32], classes: Sequence[int], capacity: int, q: float) -> LayerChoice:
    """The device's `capacity` filters of one layer (scores: (C, K) relevance)."""
    c = scores.shape[0]
    if not 1 <= capacity <= c:
        raise ConfigError(f"capacity {capacity} is outside [1, {c}] filters")
    cols = scores[:, list(classes)]
    m = max(1, math.ceil(q * c - 1e-9))
    mask = top_m(cols, m)
    while m > 1 and int(mask.any(axis=1).sum()) > capacity:  # over budget: raise the threshold
        m -= 1
        mask = top_m(cols, m)
    union = mask.any(axis=1)
    best = cols.max(axis=1)
    if int(union.sum()) > capacity:  # more classes than places even at m = 1: the strongest filters
        keep = np.zeros(c, dtype=bool)
        keep[np.argsort(-np.where(union, best, -np.inf), kind="stable")[:capacity]] = True
    else:  # free places: the filters most relevant to any of its classes
        free = capacity - int(union.sum())
        keep = union.copy()
        keep[np.argsort(-np.where(union, -np.inf, best), kind="stable")[:free]] = True
    channels = np.flatnonzero(keep).astype(np.int64)
    return LayerChoice(channels, mask[channels], m)


@dataclass(frozen=True)
class DeviceSubmodel:
    index_map: dict[str, IndexArray]
    serves: dict[str, BoolArray]  # per group: (held channels, device classes)


def device_submodel(relevance: Mapping[str, npt.NDArray[np.float32]], groups: Mapping[str, int],
                    classes: Sequence[int], width: float | Mapping[str, float], q: float) -> DeviceSubmodel:
    """Index map of a device with `classes` whose artifact keeps ⌈w·C⌉ filters of each hidden
    group (w = `width`, or `width[group]` when given per group), and what each held filter serves."""
    k = groups[CLASSES]
    bad = [c for c in classes if not 0 <= c < k]
    if bad:
        raise ConfigError(f"class {bad[0]} is out of range for a model of {k} classes")
    index_map: dict[str, IndexArray] = {}
    serves: dict[str, BoolArray] = {}
    for group, n in groups.items():
        if group == CLASSES:
            continue
        w = width if isinstance(width, (int, float)) else width[group]
        choice = select_channels(np.asarray(relevance[group]), classes, kept_channels(w, n), q)
        index_map[group], serves[group] = choice.channels, choice.serves
    index_map[CLASSES] = np.asarray(sorted(classes), dtype=np.int64)
    serves[CLASSES] = np.eye(len(classes), dtype=bool)  # row c serves class c
    return DeviceSubmodel(index_map, serves)


def harvest_weights(layout: ParamLayout, sub: DeviceSubmodel, class_counts: Sequence[float]) -> FloatArray:
    """α per coordinate of the device's sub-model buffer (the order of `Submodel.of(layout,
    sub.index_map).indices`); `class_counts[j]` = the device's samples of its j-th class."""
    counts = np.asarray(class_counts, dtype=np.float64)
    sub_layout = Submodel.of(layout, sub.index_map).sub_layout
    parts: list[npt.NDArray[np.float64]] = []
    for p in sub_layout.params:
        role = p.axes[0] if p.axes else None
        if role is None or role.group not in sub.serves:
            per_row = np.full(p.shape[0] if p.shape else 1, counts.sum())
        else:
            per_row = sub.serves[role.group].astype(np.float64) @ counts  # (held channels,)
            if role.block != 1:
                per_row = np.repeat(per_row, role.block)
        rest = math.prod(p.shape[1:]) if p.shape else 1
        parts.append(np.repeat(per_row, rest))
    return np.concatenate(parts).astype(np.float32)


def harvest_merge(global_flat: FloatArray, holders: Sequence[tuple[IndexArray, FloatArray, FloatArray]]) -> FloatArray:
    """(indices, weights, α) per device -> the harvested global model (a new array)."""
    return per_element_average(global_flat, [UpdateContribution(i, v, 1.0, a) for i, v, a in holders])
