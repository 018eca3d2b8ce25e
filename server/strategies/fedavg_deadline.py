"""`fedavg-deadline`: FedAvg that drops stragglers after a deadline (methods.md §6.1), the
standard comparison point for DISTREAL, Co-S²P and Oort."""

from __future__ import annotations

from typing import Any

from server.closing import CloseDeadline
from server.policies import SampleWeight, Strategy
from server.strategies._params import make_merge, param_float, param_optional_float, param_optional_int

NAME = "fedavg-deadline"


def build(
    *, deadline_s: Any = None, deadline_factor: Any = 1.5, merge: Any = "dense", clients_per_round: Any = None
) -> Strategy:
    """`deadline_s=None`: deadline_factor × the median task time over the online fleet (devices
    not yet timed count as slow, so round 0 has no deadline until half the fleet reported)."""
    return Strategy(
        name=NAME,
        close=CloseDeadline(
            deadline_s=param_optional_float(NAME, "deadline_s", deadline_s),
            deadline_factor=param_float(NAME, "deadline_factor", deadline_factor),
        ),
        weight=SampleWeight(),
        merge=make_merge(NAME, merge, 1.0),
        max_staleness=0,
        concurrency=param_optional_int(NAME, "clients_per_round", clients_per_round),
    )
