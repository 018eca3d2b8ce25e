"""`semi-async` (the default): Co-S²P's round (methods.md §1.3-1.4). A round closes at
K = ceil(k_fraction · N_active) updates or at the deadline, whichever comes first; clients still
training keep their stale base and land in a later round, weighted by importance over staleness;
updates are dropped when older than `age_factor` × the slowest online device's task time
(`max_staleness = "auto"`, the default), or, as in Co-S²P, when more than a fixed number of
versions stale (`max_staleness = 10`, Co-S²P's stale_ths)."""

from __future__ import annotations

from typing import Any

from runtime.errors import ConfigError
from server.closing import CloseKOrDeadline
from server.policies import Strategy
from server.strategies._params import (
    make_merge,
    make_weight,
    param_float,
    param_int,
    param_optional_float,
    param_optional_int,
)

NAME = "semi-async"


def build(
    *,
    k: Any = None,
    k_fraction: Any = 0.5,
    deadline_s: Any = None,
    deadline_factor: Any = 1.5,
    max_staleness: Any = "auto",
    age_factor: Any = 2.0,
    weight: Any = "cos2p",
    staleness_a: Any = 0.5,
    staleness_b: Any = 4.0,
    merge: Any = "masked-delta",
    server_lr: Any = 1.0,
    concurrency: Any = None,
) -> Strategy:
    """`max_staleness`: "auto" (a bound in time: `age_factor` × the slowest online device's task
    time) or a number of versions (Co-S²P: 10). `weight`: cos2p | samples | polynomial | sqrt |
    hinge | constant; `merge`: masked-delta | per-element | dense. Non-cos2p weights are
    normalised over the round by the merge."""
    if isinstance(max_staleness, str) and max_staleness != "auto":
        raise ConfigError(f"strategy {NAME!r}: max_staleness must be \"auto\" or an integer, got {max_staleness!r}")
    auto = max_staleness == "auto"
    factor = param_float(NAME, "age_factor", age_factor, lo=1.0, lo_open=False)  # checked even when unused
    return Strategy(
        name=NAME,
        close=CloseKOrDeadline(
            k=param_optional_int(NAME, "k", k),
            k_fraction=param_float(NAME, "k_fraction", k_fraction, hi=1.0),
            deadline_s=param_optional_float(NAME, "deadline_s", deadline_s),
            deadline_factor=param_float(NAME, "deadline_factor", deadline_factor),
        ),
        weight=make_weight(NAME, weight, staleness_a, staleness_b),
        merge=make_merge(NAME, merge, param_float(NAME, "server_lr", server_lr)),
        max_staleness=None if auto else param_int(NAME, "max_staleness", max_staleness, lo=0),
        max_age_factor=factor if auto else None,
        concurrency=param_optional_int(NAME, "concurrency", concurrency),
    )
