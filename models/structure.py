"""A model *structure*: which model, its input shape, and a channel count per group.

Two profiles with the same structure share one set of training artifacts (FedRolex's rolling
window and HeteroFL's leading channels at the same width, or two class subsets of the same
size), so artifacts are cached by `Structure.key()`, not by profile.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from runtime.errors import ConfigError

# Full-width channel counts per group, in graph order. "classes" is added from the dataset.
BASE_CHANNELS: dict[str, dict[str, int]] = {
    "mlp": {"fc1": 128, "fc2": 64},
    "lenet": {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84},
    "cnn": {"conv1": 32, "conv2": 32, "conv3": 64, "conv4": 64, "fc1": 128},
    "resnet": {"s1": 16, "b1": 16, "s2": 32, "b2": 32, "s3": 64, "b3": 64},
}
MODELS = tuple(BASE_CHANNELS)
# Block groups a multi-exit model has (Co-S²P, methods.md §1.2): an exit head after each conv
# stage of `cnn` and after each residual stage of `resnet`; the last exit is the model's own head.
EXIT_BLOCKS: dict[str, int] = {"cnn": 2, "resnet": 3}
# The channel groups each block group owns, in block order (what a depth-d model holds).
BLOCK_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "cnn": (("conv1", "conv2"), ("conv3", "conv4", "fc1")),
    "resnet": (("s1", "b1"), ("s2", "b2"), ("s3", "b3")),
}


@dataclass(frozen=True)
class Structure:
    model: str
    input_shape: tuple[int, ...]  # per sample, channels first: (C, H, W)
    channels: Mapping[str, int]  # every group, including "classes" (the number of outputs)
    # 0: the plain model (one head). d >= 1: the multi-exit model cut after its first d block
    # groups, with exit heads 1..d (EXIT_BLOCKS); its `logits` are exit d's.
    depth: int = 0

    def __post_init__(self) -> None:
        if self.model not in BASE_CHANNELS:
            raise ConfigError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ConfigError(f"input shape {self.input_shape} must be (channels, height, width)")
        expected = {*BASE_CHANNELS[self.model], "classes"}
        if set(self.channels) != expected:
            raise ConfigError(f"{self.model}: groups {sorted(self.channels)} != {sorted(expected)}")
        for group, n in self.channels.items():
            if n < 1:
                raise ConfigError(f"{self.model}: group {group!r} has {n} channels; needs at least 1")
        if self.depth:
            blocks = EXIT_BLOCKS.get(self.model)
            if blocks is None:
                raise ConfigError(f"model {self.model!r} has no exit heads (depth {self.depth}); "
                                  f"exits exist for {', '.join(EXIT_BLOCKS)}")
            if not 1 <= self.depth <= blocks:
                raise ConfigError(f"{self.model}: exit index {self.depth} is beyond the model's depth "
                                  f"(exits 1..{blocks})")

    @property
    def num_outputs(self) -> int:
        return self.channels["classes"]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "input_shape": list(self.input_shape),
                               "channels": dict(self.channels)}
        if self.depth:  # only when set, so the keys of plain models stay what they were
            out["depth"] = self.depth
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Structure:
        return cls(str(data["model"]), tuple(int(d) for d in data["input_shape"]),
                   {str(k): int(v) for k, v in data["channels"].items()}, int(data.get("depth", 0)))

    def key(self, extra: Mapping[str, Any] | None = None) -> str:
        blob = json.dumps({**self.to_dict(), **(extra or {})}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def full_structure(model: str, input_shape: tuple[int, ...], num_classes: int) -> Structure:
    if model not in BASE_CHANNELS:
        raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    return Structure(model, tuple(input_shape), {**BASE_CHANNELS[model], "classes": num_classes})


def sub_structure(full: Structure, index_map: Mapping[str, npt.NDArray[Any]]) -> Structure:
    """The structure of the submodel that keeps `index_map[group]` channels of each group."""
    channels = dict(full.channels)
    for group, idx in index_map.items():
        channels[group] = len(idx)
    return Structure(full.model, full.input_shape, channels, full.depth)
