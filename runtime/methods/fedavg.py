"""`fedavg`, device half and spec: every device trains the full model (methods.md §6.1).

Covers the strategies fedavg, fedavg-deadline, fedbuff, fedasync and semi-async on dense
models; the only profile is `dense`.
"""

from __future__ import annotations

from typing import ClassVar

from runtime.methods.base import SliceDevice, SliceSpec


class Spec(SliceSpec):
    name = "fedavg"
    allowed: ClassVar[frozenset[str]] = frozenset()


SPEC = Spec()
Device = SliceDevice
