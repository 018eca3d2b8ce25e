"""Named strategies: `get_strategy(name, **params)`.

| name | close | weight | merge |
|---|---|---|---|
| fedavg | all tasks in | n samples | dense / per-element |
| fedavg-deadline | all in or deadline, stragglers dropped | n samples | dense / per-element |
| semi-async (default) | K of N or deadline | Co-S²P importance/staleness | masked delta |
| fedbuff | buffer of K | 1/sqrt(1+s) | W + η Σ s Δ / K |
| fedasync | every update | α (1+s)^-a | (1−α_t) W + α_t w |
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

from runtime.errors import ConfigError
from server.policies import Strategy
from server.robust import ROBUST_DEFAULTS, robust_config
from server.strategies import fedasync, fedavg, fedavg_deadline, fedbuff, semi_async

DEFAULT_STRATEGY = semi_async.NAME

_BUILDERS: dict[str, Callable[..., Strategy]] = {
    fedavg.NAME: fedavg.build,
    fedavg_deadline.NAME: fedavg_deadline.build,
    semi_async.NAME: semi_async.build,
    fedbuff.NAME: fedbuff.build,
    fedasync.NAME: fedasync.build,
}

STRATEGY_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def strategy_defaults(name: str) -> dict[str, Any]:
    """Every parameter `name` takes, with its default (the robust keys of server/robust.py too)."""
    builder = _builder(name)
    return {**{p.name: p.default for p in inspect.signature(builder).parameters.values()}, **ROBUST_DEFAULTS}


def get_strategy(name: str = DEFAULT_STRATEGY, **params: Any) -> Strategy:
    """Build strategy `name`; ConfigError on an unknown name, parameter or value."""
    builder = _builder(name)
    defaults = strategy_defaults(name)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(
            f"strategy {name!r} has no parameter {', '.join(unknown)}; it takes {', '.join(defaults)}"
        )
    strategy = builder(**{k: v for k, v in params.items() if k not in ROBUST_DEFAULTS})
    robust = robust_config(name, dict(params), strategy.merge.form)
    # Keep every resolved parameter so a checkpoint can rebuild exactly this strategy.
    return dataclasses.replace(strategy, params={**defaults, **params}, robust=robust)


def _builder(name: str) -> Callable[..., Strategy]:
    if name not in _BUILDERS:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    return _BUILDERS[name]
