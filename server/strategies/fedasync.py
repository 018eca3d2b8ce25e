"""`fedasync`: fully asynchronous mixing (methods.md §6.5). Each update is merged on arrival:
`W ← (1 − α_t) W + α_t w_new`, α_t = α · s(t − τ) with s polynomial, hinge or constant."""

from __future__ import annotations

from typing import Any

from server.closing import CloseBuffer
from server.policies import MixMerge, Strategy
from server.strategies._params import make_weight, param_choice, param_float, param_optional_int

NAME = "fedasync"


def build(
    *,
    alpha: Any = 0.6,
    staleness: Any = "polynomial",
    staleness_a: Any = 0.5,
    staleness_b: Any = 4.0,
    concurrency: Any = None,
    max_staleness: Any = None,
) -> Strategy:
    """Typical: alpha 0.5-0.9; polynomial a = 0.5, or hinge a = 10, b = 4."""
    function = param_choice(NAME, "staleness", staleness, ("polynomial", "hinge", "constant"))
    return Strategy(
        name=NAME,
        close=CloseBuffer(k=1),
        weight=make_weight(NAME, function, staleness_a, staleness_b,
                           scale=param_float(NAME, "alpha", alpha, hi=1.0)),
        merge=MixMerge(),
        max_staleness=param_optional_int(NAME, "max_staleness", max_staleness, lo=0),
        concurrency=param_optional_int(NAME, "concurrency", concurrency),
    )
