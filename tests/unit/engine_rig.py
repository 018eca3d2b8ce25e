"""The hand-driven round engine the engine tests share: a clock, hellos, and a Rig that
remembers every action."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from runtime.protocol import Hello, Update
from server.engine import Engine, EngineConfig
from server.events import (
    Action,
    DeviceHello,
    Event,
    Log,
    NewGlobal,
    SendTask,
    Tick,
    UpdateReceived,
)
from server.policies import DenseModel, ModelOps, Strategy

N = 8


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_hello(device_id: str, n_samples: int = 1000) -> Hello:
    return Hello(device_id=device_id, board="test", cores=1.0, ram_mb=512, runtime_version="t",
                 profiles=(), n_samples=n_samples, label_histogram=())


class Rig:
    """Drives an engine by hand and remembers what came out."""

    def __init__(self, strategy: Strategy, devices: int = 3, *, model: ModelOps | None = None,
                 config: EngineConfig | None = None, assign: Any = None) -> None:
        self.clock = Clock()
        self.g0 = np.arange(N, dtype=np.float32)
        self.engine = Engine(strategy, model or DenseModel(N), self.g0, clock=self.clock, config=config,
                             assign=assign)
        self.tasks: dict[str, SendTask] = {}
        self.logs: list[Mapping[str, Any]] = []
        self.globals: list[NewGlobal] = []
        self.actions: list[Action] = []
        self.ids = [f"d{i}" for i in range(devices)]
        for d in self.ids:
            self.send(DeviceHello(d, make_hello(d)))
        self.send(Tick())

    def send(self, event: Event) -> list[Action]:
        out = self.engine.handle(event)
        self.actions += out
        for a in out:
            if isinstance(a, SendTask):
                self.tasks[a.device_id] = a
            elif isinstance(a, Log):
                self.logs.append(a.event)
            elif isinstance(a, NewGlobal):
                self.globals.append(a)
        return out

    def at(self, t: float) -> Rig:
        self.clock.now = t
        return self

    def update(self, device: str, values: np.ndarray | None = None, *, kind: str = "delta",
               task: SendTask | None = None, n_samples: int = 10, indices: np.ndarray | None = None) -> list[Action]:
        task = task or self.tasks[device]
        size = N if task.indices is None else task.indices.size
        if values is None:
            values = np.full(size, float(self.ids.index(device) + 1), np.float32)
        upd = Update(task_id=task.task_id, device_id=device, base_version=task.base_version, n_samples=n_samples,
                     train_s=1.0, peak_rss_mb=1.0, energy_j=None, kind=kind)
        return self.send(UpdateReceived(device, upd, values, indices))

    def events(self, name: str) -> list[Mapping[str, Any]]:
        return [e for e in self.logs if e["event"] == name]


def sent(actions: list[Action]) -> list[SendTask]:
    return [a for a in actions if isinstance(a, SendTask)]
