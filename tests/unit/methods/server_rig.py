"""A pure engine with a few devices, for the server-half tests (no I/O, a fixed clock)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from runtime.layout import ParamLayout
from runtime.profile import parse_profile
from runtime.protocol import Hello, Update
from runtime.submodel import IndexArray, Submodel, index_map_for
from server.engine import Engine
from server.events import Action, DeviceHello, Log, SendTask, Tick, UpdateReceived
from server.methods import server_method
from server.policies import ModelOps, ProfileByDevice, Strategy


class Rig:
    def __init__(self, strategy: Strategy, model: ModelOps, profiles: Mapping[str, str], *,
                 method: str | None = None, params: Mapping[str, Any] | None = None,
                 histograms: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self.g0 = np.linspace(-1, 1, model.n_params).astype(np.float32)
        self.method = server_method(method, params or {}, model)
        self.engine = Engine(strategy, model, self.g0, clock=lambda: 0.0, assign=ProfileByDevice(dict(profiles)),
                             method=self.method)
        self.actions: list[Action] = []
        for d in profiles:
            # 1000 samples declared: an update's n_samples is capped at the hello's
            hello = Hello(d, "test", 1.0, 512, "t", (profiles[d],), 1000, (histograms or {}).get(d, ()))
            self.actions += self.engine.handle(DeviceHello(d, hello))
        self.actions += self.engine.handle(Tick())

    def task(self, device: str) -> SendTask:
        return [a for a in self.actions if isinstance(a, SendTask) and a.device_id == device][-1]

    def update(self, device: str, weights: np.ndarray, n_samples: int = 10) -> None:
        task = self.task(device)
        values = weights if task.indices is None else weights[task.indices]
        upd = Update(task.task_id, device, task.base_version, n_samples, 0.0, 0.0, None, "weights")
        self.actions += self.engine.handle(UpdateReceived(device, upd, np.asarray(values, np.float32)))

    def logs(self, name: str) -> list[Mapping[str, Any]]:
        return [a.event for a in self.actions if isinstance(a, Log) and a.event["event"] == name]


class LayoutModel:
    """ModelOps over a real ParamLayout (runtime.submodel slicing); artifact keys are profiles."""

    def __init__(self, layout: ParamLayout) -> None:
        self.layout = layout

    @property
    def n_params(self) -> int:
        return self.layout.total

    def indices_for(self, profile: str, round_index: int) -> IndexArray | None:
        sub = Submodel.of(self.layout, index_map_for(parse_profile(profile), self.layout.groups, round_index))
        return None if sub.is_full else sub.indices

    def artifact_key(self, profile: str) -> str:
        return parse_profile(profile).canonical()
