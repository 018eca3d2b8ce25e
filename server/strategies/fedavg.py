"""`fedavg`: synchronous FedAvg (methods.md §6.1). Every round waits for all its tasks; a device
that goes offline has its task abandoned. `merge="per-element"` gives HeteroFL/FjORD/FedRolex
when devices train submodels."""

from __future__ import annotations

from typing import Any

from server.closing import CloseAll
from server.policies import SampleWeight, Strategy
from server.strategies._params import make_merge, param_optional_int

NAME = "fedavg"


def build(*, merge: Any = "dense", clients_per_round: Any = None) -> Strategy:
    return Strategy(
        name=NAME,
        close=CloseAll(),
        weight=SampleWeight(),
        merge=make_merge(NAME, merge, 1.0),
        max_staleness=0,  # sync: every update must start from the current model
        concurrency=param_optional_int(NAME, "clients_per_round", clients_per_round),
    )
