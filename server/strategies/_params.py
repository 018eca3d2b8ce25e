"""Parameter checking shared by the strategy builders: every bad value is a ConfigError that
names the strategy, the parameter and the value."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from runtime.errors import ConfigError
from server.policies import (
    STALENESS_FUNCTIONS,
    CoS2PWeight,
    DenseMerge,
    MaskedDeltaMerge,
    MergePolicy,
    PerElementMerge,
    SampleWeight,
    StalenessWeight,
    WeightPolicy,
)


def param_float(strategy: str, name: str, value: Any, *, lo: float = 0.0, lo_open: bool = True,
                hi: float = math.inf) -> float:
    """`value` as a float in (lo, hi] (or [lo, hi] with lo_open=False), else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ConfigError(f"strategy {strategy!r}: {name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        bracket = "(" if lo_open else "["
        raise ConfigError(f"strategy {strategy!r}: {name}={value!r} is outside {bracket}{lo}, {hi}]")
    return v


def param_int(strategy: str, name: str, value: Any, *, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"strategy {strategy!r}: {name} must be an integer, got {value!r}")
    if int(value) < lo:
        raise ConfigError(f"strategy {strategy!r}: {name}={value!r} must be >= {lo}")
    return int(value)


def param_optional_float(strategy: str, name: str, value: Any) -> float | None:
    return None if value is None else param_float(strategy, name, value)


def param_optional_int(strategy: str, name: str, value: Any, *, lo: int = 1) -> int | None:
    return None if value is None else param_int(strategy, name, value, lo=lo)


def param_choice(strategy: str, name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"strategy {strategy!r}: {name}={value!r} is not one of {', '.join(choices)}")
    return str(value)


MERGES = ("dense", "per-element", "masked-delta")


def make_merge(strategy: str, merge: Any, server_lr: float) -> MergePolicy:
    """The sync/semi-async merge named `merge`."""
    name = param_choice(strategy, "merge", merge, MERGES)
    if name == "dense":
        return DenseMerge(server_lr)
    if name == "per-element":
        return PerElementMerge(server_lr)
    return MaskedDeltaMerge(server_lr)


WEIGHTS = ("samples", "cos2p", *STALENESS_FUNCTIONS)


def make_weight(strategy: str, weight: Any, a: Any, b: Any, *, scale: float = 1.0,
                by_samples: bool = False) -> WeightPolicy:
    name = param_choice(strategy, "weight", weight, WEIGHTS)
    if name == "samples":
        return SampleWeight()
    if name == "cos2p":
        return CoS2PWeight()
    a_val = param_float(strategy, "staleness_a", a, lo=0.0, lo_open=False)
    b_val = param_float(strategy, "staleness_b", b, lo=0.0, lo_open=False)
    return StalenessWeight(function=name, a=a_val, b=b_val, scale=scale, by_samples=by_samples)

