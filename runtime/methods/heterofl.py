"""`heterofl`, device half and spec: a device trains ⌈βC⌉ channels of every hidden group
(methods.md §6.3), the leading ones (HeteroFL) or a window rolling with the round (FedRolex).

Profiles: `dense`, `width=β`, `width=β,window=rolling`, `width=β,widths=conv1:0.5+conv2:0.5`
(groups with their own width: a baseline at the FLOPs of a Chen & Qin sub-model). [method] keys: `window` (the window of
profiles that do not name one: leading | rolling), `average` (samples | count: weigh each
covering update by its sample count, or count each once as HeteroFL's paper does).
The device trains whatever slice the server sent; which channels those are is the server's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from runtime.errors import ConfigError
from runtime.methods.base import SliceDevice, SliceSpec
from runtime.profile import WINDOWS

AVERAGES = ("samples", "count")


class Spec(SliceSpec):
    name = "heterofl"
    allowed: ClassVar[frozenset[str]] = frozenset({"width", "window", "group_widths"})
    param_defaults: ClassVar[Mapping[str, Any]] = {"window": "leading", "average": "samples"}
    strategy_defaults: ClassVar[Mapping[str, Any]] = {"merge": "per-element"}

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        if params["window"] not in WINDOWS:
            raise ConfigError(f"[method] heterofl: window {params['window']!r} is not one of {', '.join(WINDOWS)}")
        if params["average"] not in AVERAGES:
            raise ConfigError(f"[method] heterofl: average {params['average']!r} is not one of {', '.join(AVERAGES)}")
        return params


SPEC = Spec()
Device = SliceDevice
