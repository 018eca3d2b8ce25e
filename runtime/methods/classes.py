"""`classes`, device half and spec: a device trains the classifier rows of a class subset and
sees only those classes' samples, labels mapped to its rows (Chen & Qin's sub-model, minus the
relevance search, which is its own issue). A width may shrink the hidden groups as well.

Profiles: `classes=0-4`, `classes=0+3+7`, `classes=0-4,width=0.5`, `dense`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from runtime.methods.base import SliceDevice, SliceSpec


class Spec(SliceSpec):
    name = "classes"
    allowed: ClassVar[frozenset[str]] = frozenset({"classes", "width", "window"})
    strategy_defaults: ClassVar[Mapping[str, Any]] = {"merge": "per-element"}


SPEC = Spec()
Device = SliceDevice
