"""`mpsl`, device half and spec: MP-SL's data owner (methods.md §4). It trains M_1 and M_P through a
`runtime.split_owner.SplitOwner` backend, whose every step runs the per-batch protocol with the
compute nodes; at the end of the local epoch it tells the chain (the nodes then FedAvg their
per-owner copies) and hands M_1 and M_P up for the aggregator's FedAvg.

The only profile is `split`. [method] keys: `cuts` (layer names ending each part, the first ends
M_1, the last ends the last node's part; `orchard mpsl plan` chooses them), `batch` (the probes
fix it), `timeout_s` (how long an owner waits for a compute node before it reports it lost).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from runtime.errors import ConfigError
from runtime.layout import FloatArray
from runtime.methods.base import BackendOpener, DeviceMethod, MethodSpec
from runtime.protocol import Assignment
from runtime.split_owner import SplitOwner

PROFILE = "split"


class Spec(MethodSpec):
    name = "mpsl"
    param_defaults: ClassVar[Mapping[str, Any]] = {"cuts": ["conv2", "fc1"], "batch": 32, "timeout_s": 60.0}

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        cuts = params["cuts"]
        if not isinstance(cuts, list) or len(cuts) < 2 or not all(isinstance(c, str) and c for c in cuts):
            raise ConfigError(f"[method] mpsl: cuts must list at least two layer names (M_1 | nodes | M_P), "
                              f"got {cuts!r}")
        batch = params["batch"]
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"[method] mpsl: batch must be a positive integer, got {batch!r}")
        t = params["timeout_s"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ConfigError(f"[method] mpsl: timeout_s must be a positive number, got {t!r}")
        return params

    def parse_profile(self, text: str, params: Mapping[str, Any] | None) -> str:
        if text.strip() != PROFILE:
            raise ConfigError(f"method 'mpsl' takes only the profile {PROFILE!r}, got {text!r}")
        return PROFILE

    def artifact_profiles(self, profile: str, params: Mapping[str, Any]) -> tuple[str, ...]:
        # The assembled model, which the aggregator scores; the parts are the build half's.
        return ("dense",)

    def extras(self, profile: str, params: Mapping[str, Any]) -> dict[str, Any]:
        p = self.params(params)  # the defaults for keys the campaign left out
        return {"cuts": list(p["cuts"]), "batch": int(p["batch"]), "timeout_s": float(p["timeout_s"])}


SPEC = Spec()


class Device(DeviceMethod):
    """The trainer loop drives the owner backend batch by batch; `trained` closes the epoch."""

    def __init__(self, assignment: Assignment, open_backend: BackendOpener) -> None:
        super().__init__(assignment, open_backend)
        if not isinstance(self.primary, SplitOwner):
            raise ConfigError(f"method 'mpsl' needs a split-owner backend for {assignment.primary_key!r}, "
                              f"got {type(self.primary).__name__}")
        self.owner: SplitOwner = self.primary
        self._sent0 = 0
        self._wait0 = 0.0
        self.batches = 0

    def start(self, weights: FloatArray | None, lr: float, rng: np.random.Generator) -> None:
        super().start(weights, lr, rng)
        self._sent0, self._wait0 = self.owner.bytes_sent, self.owner.wait_s

    def trained(self) -> FloatArray:
        self.batches = self.owner.end_epoch()
        return super().trained()

    def report(self) -> dict[str, float]:
        return {"batches": float(self.batches), "split_bytes_sent": float(self.owner.bytes_sent - self._sent0),
                "node_wait_s": self.owner.wait_s - self._wait0}
