"""How a model's parameters sit in one flat float32 buffer, and which channels each axis follows.

ONNX Runtime hands the trainable parameters out as one contiguous buffer, ordered as the
training graph lists them. A `ParamLayout` names each tensor's slice of that buffer and, per
axis, the *channel group* it follows (for example axis 0 of `conv2.W` follows group `conv2`,
axis 1 follows `conv1`). Submodel slicing, per-element merging and wire validation all work
from this one description.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from runtime.errors import LayoutError
from runtime.record import record

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float32]
else:
    FloatArray = Any  # numpy is imported by the methods that use it: the agent starts without it


@record
class AxisGroup:
    """Axis of a tensor that follows a channel group; `block` elements per channel.

    `block` > 1 appears where a conv output is flattened into a dense layer: channel c owns
    elements `c*block ... (c+1)*block - 1` of that axis.
    """

    group: str
    block: int = 1


@record
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    offset: int
    axes: tuple[AxisGroup | None, ...]
    kind: str = "weight"  # weight | bias | scale

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.size


@record
class ParamLayout:
    params: tuple[ParamSpec, ...]
    groups: Mapping[str, int]  # channel count of every group this layout's axes refer to

    def __post_init__(self) -> None:
        offset = 0
        for p in self.params:
            if p.offset != offset:
                raise LayoutError(f"parameter {p.name!r} starts at {p.offset}, expected {offset}")
            if len(p.axes) != len(p.shape):
                raise LayoutError(f"parameter {p.name!r} has {len(p.shape)} axes but {len(p.axes)} roles")
            for dim, ax in zip(p.shape, p.axes):
                if ax is None:
                    continue
                if ax.group not in self.groups:
                    raise LayoutError(f"parameter {p.name!r} follows unknown group {ax.group!r}")
                if dim != self.groups[ax.group] * ax.block:
                    raise LayoutError(
                        f"parameter {p.name!r}: axis of size {dim} does not match group "
                        f"{ax.group!r} ({self.groups[ax.group]} channels x block {ax.block})"
                    )
            offset = p.end

    @property
    def total(self) -> int:
        return self.params[-1].end if self.params else 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def __iter__(self) -> Iterator[ParamSpec]:
        return iter(self.params)

    def __getitem__(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise LayoutError(f"no parameter named {name!r} in layout")

    def check(self, flat: npt.NDArray[Any], what: str = "parameter buffer") -> FloatArray:
        """Return `flat` as a 1-D float32 array, or raise naming the mismatch."""
        import numpy as np

        arr = np.asarray(flat)
        if arr.dtype != np.float32:
            raise LayoutError(f"{what} has dtype {arr.dtype}, expected float32")
        if arr.ndim != 1 or arr.size != self.total:
            raise LayoutError(f"{what} has shape {arr.shape}, expected ({self.total},)")
        return arr

    def split(self, flat: npt.NDArray[Any]) -> dict[str, FloatArray]:
        """Named views into `flat` (no copy)."""
        arr = self.check(flat)
        return {p.name: arr[p.offset : p.end].reshape(p.shape) for p in self.params}

    def join(self, tensors: Mapping[str, npt.NDArray[Any]]) -> FloatArray:
        """Pack named tensors into one new flat buffer in layout order."""
        import numpy as np

        out = np.empty(self.total, dtype=np.float32)
        for p in self.params:
            if p.name not in tensors:
                raise LayoutError(f"tensor {p.name!r} missing")
            t = np.asarray(tensors[p.name])
            if tuple(t.shape) != p.shape:
                raise LayoutError(f"tensor {p.name!r} has shape {tuple(t.shape)}, expected {p.shape}")
            out[p.offset : p.end] = t.reshape(-1)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": dict(self.groups),
            "params": [
                {
                    "name": p.name,
                    "shape": list(p.shape),
                    "offset": p.offset,
                    "kind": p.kind,
                    "axes": [None if a is None else [a.group, a.block] for a in p.axes],
                }
                for p in self.params
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParamLayout:
        try:
            params = tuple(
                ParamSpec(
                    name=str(p["name"]),
                    shape=tuple(int(d) for d in p["shape"]),
                    offset=int(p["offset"]),
                    kind=str(p.get("kind", "weight")),
                    axes=tuple(None if a is None else AxisGroup(str(a[0]), int(a[1])) for a in p["axes"]),
                )
                for p in data["params"]
            )
            groups = {str(k): int(v) for k, v in data["groups"].items()}
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise LayoutError(f"malformed layout description: {exc!r}") from exc
        return cls(params=params, groups=groups)

    def fingerprint(self) -> str:
        """Stable short hash of the structure (names, shapes, axis roles), not of values."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
