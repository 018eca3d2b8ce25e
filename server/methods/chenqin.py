"""`chenqin`, server half (methods.md §3): relevance on the global model, class-subset sub-models,
harvest merge.

- Relevance (runtime/relevance.py) is scored on the proxy split with the relevance artifact at
  version 0 (or read from `relevance_file`) and again after every `relevance_every`-th merge
  (`on_global`), before any task of the new version goes out.
- `assign`: a device with `classes=C_k,width=β` gets the union of the filters relevant to C_k,
  fitted to ⌈βC⌉ per group (server/harvest.py), and the classifier rows of C_k. The indices
  depend on the relevance, so they are not derivable from the profile: the checkpoint stores
  them with each task (`indices_derivable = False`).
- `admit`: the update must cover exactly the task's coordinates; each coordinate's weight is
  the device's sample count of the classes it serves (its hello's label histogram), which the
  strategy's per-element merge turns into the harvest `Σ α w / Σ α` (each update weighs 1
  besides: `weight_policy`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.errors import ConfigError, RoundError
from runtime.layout import ParamLayout
from runtime.profile import Profile, parse_profile
from runtime.protocol import Assignment, Hello
from runtime.relevance import Relevance, RelevanceSession
from runtime.submodel import Submodel
from server.admission import Payload
from server.aggregate import FloatArray, IndexArray
from server.events import UpdateReceived
from server.harvest import DeviceSubmodel, device_submodel, harvest_weights
from server.methods.base import ServerMethod
from server.methods.heterofl import CountWeight
from server.policies import ModelOps, Strategy, WeightPolicy
from server.records import TaskRecord

log = logging.getLogger(__name__)
KEEP_VERSIONS = 8  # relevance versions kept for updates still in flight (staleness beyond it is refused)


class Server(ServerMethod):
    name = "chenqin"
    indices_derivable = False
    profile_slices_fixed = False

    def __init__(self, params: Mapping[str, Any], model: ModelOps) -> None:
        super().__init__(params, model)
        self.p = self.spec.params(self.params)
        layout = getattr(model, "layout", None)
        if not isinstance(layout, ParamLayout):
            raise ConfigError("method 'chenqin' needs the model's layout (a ServerModel)")
        self.layout: ParamLayout = layout
        self.relevance: Relevance | None = None
        if self.p["relevance_file"]:
            self.relevance = Relevance.load(Path(self.p["relevance_file"]), layout)
        self._session: RelevanceSession | None = None
        self._proxy: tuple[FloatArray, npt.NDArray[np.int64]] | None = None
        self._histograms: dict[str, tuple[int, ...]] = {}
        self._submodels: dict[tuple[str, int], tuple[DeviceSubmodel, Submodel]] = {}
        # Scores by version, so an update is harvested with the relevance its task was assigned under.
        self._history: dict[int, Relevance] = {} if self.relevance is None else {self.relevance.version: self.relevance}

    # ------------------------------------------------------------ relevance
    def _scorer(self) -> tuple[RelevanceSession, tuple[FloatArray, npt.NDArray[np.int64]]]:
        if self._session is None or self._proxy is None:
            extra = getattr(self.model, "extra_dirs", {}).get("relevance")
            proxy = getattr(self.model, "proxy_path", None)
            if extra is None or proxy is None:
                raise ConfigError("method 'chenqin': artifacts.json names no relevance artifact or proxy split "
                                  "(the campaign writes both), and no relevance_file is given")
            self._session = RelevanceSession(Path(extra), self.layout)
            with np.load(proxy, allow_pickle=False) as data:
                self._proxy = (data["x"].astype(np.float32), data["y"].astype(np.int64))
        return self._session, self._proxy

    def on_global(self, version: int, flat: FloatArray) -> None:
        every = int(self.p["relevance_every"])
        current = self.relevance
        if current is not None and (every == 0 or version - current.version < every):
            return
        if current is not None and version < current.version:  # a resumed run older than the file
            return
        session, (x, y) = self._scorer()
        self.relevance = session.score(np.asarray(flat), x, y, version)
        self._history[version] = self.relevance
        for old in sorted(self._history)[:-KEEP_VERSIONS]:
            del self._history[old]
        self._submodels = {k: v for k, v in self._submodels.items() if k[1] in self._history}
        log.info("chenqin: relevance rescored at version %d on %d proxy samples", version, len(y))

    def on_hello(self, device_id: str, hello: Hello) -> None:
        self._histograms[device_id] = tuple(hello.label_histogram)

    # ------------------------------------------------------------ assignment
    def submodel(self, profile: str) -> tuple[DeviceSubmodel, Submodel]:
        p = parse_profile(profile)
        classes = self.classes_of(p)
        if self.relevance is None:
            raise ConfigError("chenqin: no relevance yet (on_global has not run)")
        key = (p.canonical(), self.relevance.version)
        if key not in self._submodels:
            dev = device_submodel(self.relevance.scores, self.layout.groups, classes, _widths(p, self.layout),
                                  self.p["q"])
            self._submodels[key] = (dev, Submodel.of(self.layout, dev.index_map))
        return self._submodels[key]

    def classes_of(self, p: Profile) -> tuple[int, ...]:
        """The profile's classes; `dense` (a device that serves every class) has all of them."""
        if p.classes is not None:
            return p.classes
        if p.canonical() == "dense":
            return tuple(range(int(self.layout.groups["classes"])))
        raise ConfigError(f"chenqin profile {p.canonical()!r} names no classes (the campaign fills them in)")

    def assign(self, profile: str, round_index: int) -> tuple[Assignment, IndexArray | None]:
        canonical = self.canonical(profile)
        keys = tuple(self.model.artifact_key(q) for q in self.spec.artifact_profiles(canonical, self.p))
        _, sub = self.submodel(canonical)
        assert self.relevance is not None
        extras = {"relevance_version": self.relevance.version}
        return Assignment(self.name, canonical, keys, extras), (None if sub.is_full else sub.indices)

    # ------------------------------------------------------------ harvest
    def weight_policy(self, strategy_weight: WeightPolicy) -> WeightPolicy:
        """One per update: the per-coordinate α (sample counts of the served classes) is the whole
        weight, so `Σ α w / Σ α` is not multiplied by the strategy's n_samples a second time."""
        return CountWeight()

    def admit(self, event: UpdateReceived, task: TaskRecord, base: FloatArray, strategy: Strategy,
              who: str) -> Payload:
        if event.indices is not None and (task.indices is None or not np.array_equal(event.indices, task.indices)):
            raise RoundError(f"{who}: update covers {np.asarray(event.indices).size} coordinates that differ from "
                             f"the assignment of profile {task.profile!r}")
        payload = super().admit(event, task, base, strategy, who)
        p = parse_profile(task.profile)
        try:
            classes = self.classes_of(p)
        except ConfigError as exc:
            raise RoundError(f"{who}: {exc}") from None
        hist = self._histograms.get(task.device_id, ())
        counts = [hist[c] if c < len(hist) else 0 for c in classes]
        empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
        if empty and p.classes is not None:  # a declared subset must have data; `dense` serves what it has
            raise RoundError(f"{who}: device holds no sample of class {empty[0]} of its subset {list(classes)}")
        dev = self._submodel_at(task, task.assignment.extras.get("relevance_version"))
        alpha = harvest_weights(self.layout, dev, counts)
        if alpha.size != payload.values.size:
            raise RoundError(f"{who}: {payload.values.size} values, the harvest expects {alpha.size}")
        return dataclasses.replace(payload, coord_weights=alpha)

    def _submodel_at(self, task: TaskRecord, version: Any) -> DeviceSubmodel:
        """The device sub-model the task was assigned, under the relevance it was assigned with."""
        rel = self._history.get(version) if isinstance(version, int) else None
        p = parse_profile(task.profile)
        if rel is None:
            raise RoundError(f"update for task {task.task_id!r}: its relevance version {version!r} is no longer "
                             f"retained (kept: {sorted(self._history)})")
        dev = device_submodel(rel.scores, self.layout.groups, self.classes_of(p), _widths(p, self.layout),
                              self.p["q"])
        if task.indices is not None and not np.array_equal(Submodel.of(self.layout, dev.index_map).indices,
                                                           task.indices):
            raise RoundError(f"task {task.task_id!r}: its indices differ from the assignment of {task.profile!r}")
        return dev


def _widths(p: Profile, layout: ParamLayout) -> dict[str, float]:
    return {g: p.width_of(g) for g in layout.groups}
