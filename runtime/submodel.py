"""Slice a global parameter buffer to a submodel and scatter it back.

A submodel keeps, per channel group, an index set of the global channels: the leading
`ceil(beta*C)` (HeteroFL, FjORD), a rolling window `(t + j) mod C` (FedRolex), or any set
(data-aware masks, filter dropout, class subsets). Every tensor axis that follows a group is
sliced with that group's set, so producer outputs and consumer inputs stay consistent.

All of it reduces to one int64 array of flat indices into the global buffer (`Submodel.indices`):
`sub = global[indices]` and `global[indices] = sub`. Device and server share this code.
"""

from __future__ import annotations

import math
from typing import Collection, Mapping

import numpy as np
import numpy.typing as npt

from runtime.errors import ConfigError, LayoutError
from runtime.layout import FloatArray, ParamLayout, ParamSpec
from runtime.profile import Profile
from runtime.record import record

IndexArray = npt.NDArray[np.int64]
IndexMap = Mapping[str, IndexArray]

CLASSES = "classes"


def kept_channels(width: float, channels: int) -> int:
    """Channels a width-`width` submodel keeps of a `channels`-wide group (at least one)."""
    return max(1, min(channels, math.ceil(width * channels - 1e-9)))


def depth_blocks(depth: float, blocks: int) -> int:
    """Block groups a depth-rate-`depth` multi-exit model keeps of `blocks`: ⌊ρ_d·B⌋ (Co-S²P),
    ConfigError naming the rate when that is none."""
    d = math.floor(depth * blocks + 1e-9)
    if d < 1:
        raise ConfigError(f"depth rate {depth:g} keeps no block group of {blocks} (needs >= {1 / blocks:.3g})")
    return d


def index_map_for(profile: Profile, groups: Mapping[str, int], round_index: int = 0) -> dict[str, IndexArray]:
    """The per-group channel sets a device with `profile` trains in round `round_index`."""
    out: dict[str, IndexArray] = {}
    unknown = [g for g, _ in profile.group_widths if g not in groups or g == CLASSES]
    if unknown:
        raise ConfigError(f"profile widths name {unknown[0]!r}, not a hidden group of the model "
                          f"({', '.join(g for g in groups if g != CLASSES)})")
    for group, n in groups.items():
        width = profile.width_of(group)
        if group == CLASSES or width >= 1.0:
            continue
        k = kept_channels(width, n)
        if profile.window == "rolling":
            out[group] = np.sort((round_index + np.arange(k, dtype=np.int64)) % n)
        else:
            out[group] = np.arange(k, dtype=np.int64)
    for group, rate in profile.drop:
        if group not in groups or group == CLASSES:
            raise ConfigError(f"profile drops channels of {group!r}, which is not a hidden group of the model "
                              f"({', '.join(g for g in groups if g != CLASSES)})")
        k = kept_channels(1.0 - rate, groups[group])
        if k < groups[group]:  # leading here: the structure; a device draws its own set per batch
            out[group] = np.arange(k, dtype=np.int64)
    if profile.classes is not None:
        n_classes = groups[CLASSES]
        if max(profile.classes) >= n_classes:
            raise ConfigError(f"profile class subset {list(profile.classes)} exceeds the model's {n_classes} classes")
        out[CLASSES] = np.asarray(profile.classes, dtype=np.int64)
    return out


def _axis_indices(p: ParamSpec, axis: int, index_map: IndexMap) -> IndexArray:
    role = p.axes[axis]
    if role is None or role.group not in index_map:
        return np.arange(p.shape[axis], dtype=np.int64)
    chans = np.asarray(index_map[role.group], dtype=np.int64)
    if role.block == 1:
        return chans
    return (chans[:, None] * role.block + np.arange(role.block, dtype=np.int64)[None, :]).reshape(-1)


def _check_index_map(layout: ParamLayout, index_map: IndexMap) -> None:
    for group, idx in index_map.items():
        if group not in layout.groups:
            raise LayoutError(f"index map names unknown group {group!r}")
        arr = np.asarray(idx)
        n = layout.groups[group]
        if arr.ndim != 1 or arr.size == 0:
            raise LayoutError(f"index set of group {group!r} must be a non-empty 1-D array, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise LayoutError(f"index set of group {group!r} has dtype {arr.dtype}, expected integers")
        if arr.min() < 0 or arr.max() >= n:
            raise LayoutError(f"index set of group {group!r} leaves [0, {n}): min {arr.min()}, max {arr.max()}")
        if arr.size > 1 and np.any(np.diff(arr) <= 0):
            raise LayoutError(f"index set of group {group!r} must be strictly increasing")


@record(eq=False)
class Submodel:
    """A global layout restricted by an index map; `indices` gathers the submodel's flat buffer."""

    layout: ParamLayout  # the global model's
    sub_layout: ParamLayout
    indices: IndexArray

    @classmethod
    def of(cls, layout: ParamLayout, index_map: IndexMap, tensors: Collection[str] | None = None) -> Submodel:
        """`tensors`: only these of the layout's tensors (a depth-cut multi-exit model holds the
        first block groups' and their exits'); None: all of them."""
        _check_index_map(layout, index_map)
        if tensors is not None:
            unknown = set(tensors) - set(layout.names)
            if unknown:
                raise LayoutError(f"submodel names tensors the layout lacks: {sorted(unknown)[:3]}")
        specs: list[ParamSpec] = []
        parts: list[IndexArray] = []
        offset = 0
        for p in layout.params:
            if tensors is not None and p.name not in tensors:
                continue
            axis_idx = [_axis_indices(p, a, index_map) for a in range(len(p.shape))]
            shape = tuple(len(ix) for ix in axis_idx)
            # Row-major flat index = offset + sum_k idx_k * stride_k, broadcast over the axes.
            strides = np.cumprod((1, *p.shape[:0:-1]))[::-1] if p.shape else np.array([], dtype=np.int64)
            flat = np.full((1,) * len(shape), p.offset, dtype=np.int64)
            for a, (ix, stride) in enumerate(zip(axis_idx, strides)):
                view = [1] * len(shape)
                view[a] = len(ix)
                flat = flat + (ix * int(stride)).reshape(view)
            parts.append(flat.reshape(-1))
            specs.append(ParamSpec(name=p.name, shape=shape, offset=offset, axes=p.axes, kind=p.kind))
            offset += math.prod(shape)
        groups = dict(layout.groups)
        for group, idx in index_map.items():
            groups[group] = len(idx)
        indices = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return cls(layout=layout, sub_layout=ParamLayout(params=tuple(specs), groups=groups), indices=indices)

    @property
    def is_full(self) -> bool:
        return self.sub_layout.total == self.layout.total

    def extract(self, global_flat: npt.NDArray[np.float32]) -> FloatArray:
        """The submodel's flat buffer (a new array)."""
        return self.layout.check(global_flat, "global buffer")[self.indices]

    def scatter(self, global_flat: npt.NDArray[np.float32], sub_flat: npt.NDArray[np.float32]) -> FloatArray:
        """A copy of `global_flat` with the submodel's coordinates replaced by `sub_flat`."""
        out = self.layout.check(global_flat, "global buffer").copy()
        out[self.indices] = self.sub_layout.check(sub_flat, "submodel buffer")
        return out
