"""`fedbuff`: buffered asynchronous aggregation (methods.md §6.6). Every idle device gets the
latest model at once (at most `concurrency` out); each arriving delta is weighted by
s(staleness) = 1/sqrt(1 + s); after K of them, `W ← W + η_g Σ s_i Δ_i / K`."""

from __future__ import annotations

from typing import Any

from server.closing import CloseBuffer
from server.policies import BufferMerge, Strategy
from server.strategies._params import make_weight, param_float, param_int, param_optional_int

NAME = "fedbuff"


def build(
    *,
    k: Any = 10,
    concurrency: Any = None,
    weight: Any = "sqrt",
    staleness_a: Any = 0.5,
    staleness_b: Any = 4.0,
    server_lr: Any = 1.0,
    max_staleness: Any = None,
) -> Strategy:
    """`max_staleness=None`: no cap (FedBuff down-weights stale updates instead of dropping them)."""
    return Strategy(
        name=NAME,
        close=CloseBuffer(k=param_int(NAME, "k", k)),
        weight=make_weight(NAME, weight, staleness_a, staleness_b),
        merge=BufferMerge(param_float(NAME, "server_lr", server_lr)),
        max_staleness=param_optional_int(NAME, "max_staleness", max_staleness, lo=0),
        concurrency=param_optional_int(NAME, "concurrency", concurrency),
    )
