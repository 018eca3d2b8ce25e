"""The device side of a method: its spec (profile grammar, [method] keys) and its hooks.

A `DeviceMethod` runs in the trainer child, which owns the data and the backends. Per task the
child builds one from the task's `Assignment`; `Trainer.train` then calls

    start(weights, lr, rng)        load the received weights (in the primary artifact's layout)
    before_step(step, feeds) -> backend   the backend this step trains (FjORD switches per batch);
                                   it may add feeds (a distillation teacher's logits)
    after_step(step, backend, loss)
    trained() -> weights           in the primary layout
    pack(received, trained, form)  the update body: values in `form` (weights | delta) + report

The default implementation trains the primary artifact as it is: that is fedavg, heterofl
(leading or rolling: the server chose the coordinates) and classes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from runtime.errors import ConfigError, LayoutError
from runtime.layout import FloatArray, ParamLayout
from runtime.profile import Profile, parse_profile
from runtime.protocol import Assignment, SparseTensor, Tensor
from runtime.record import field, field_table, record, replace

# numpy and the backend only where tensors are handled: the device config's profile check
# imports this module (runtime/device_config.py), and the agent starts without numpy.
if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from runtime.backend import MutableFeeds, TrainingBackend

BackendOpener = Callable[[str], "TrainingBackend"]  # artifact key -> an opened backend (cached by the caller)


@record
class UpdateBody:
    """What a device method hands back: its values in the primary layout, their form, which
    coordinates they are (None: all of them, in order; else strictly increasing flat indices of
    the primary layout, e.g. a top-k upload), and the method's report."""

    form: str  # weights | delta
    values: FloatArray
    report: Mapping[str, float] = field(default_factory=dict)
    indices: npt.NDArray[np.int64] | None = None

    def tensors(self, layout: ParamLayout) -> dict[str, Tensor]:
        """The update's tensors: dense when every coordinate is sent, else sparse per tensor
        (only what was sent travels, and the server merges only that); within a sparse body a
        tensor sent whole goes dense."""
        if self.indices is None:
            return dict(layout.split(self.values))
        import numpy as np

        idx = np.asarray(self.indices, dtype=np.int64)
        values = np.asarray(self.values, dtype=np.float32)
        if idx.shape != values.shape or (idx.size > 1 and np.any(np.diff(idx) <= 0)):
            raise LayoutError(f"update body: {idx.size} indices for {values.size} values, or not increasing")
        if idx.size and (idx[0] < 0 or idx[-1] >= layout.total):
            raise LayoutError(f"update body indices leave [0, {layout.total})")
        out: dict[str, Tensor] = {}
        for p in layout:
            lo, hi = np.searchsorted(idx, [p.offset, p.end])
            if hi - lo == p.size:  # every coordinate sent (a bias next to top-k weights): dense is smaller
                out[p.name] = values[lo:hi].reshape(p.shape).copy()
            else:
                out[p.name] = SparseTensor(p.shape, idx[lo:hi] - p.offset, values[lo:hi].copy())
        return out


class DeviceMethod:
    label_classes: tuple[int, ...] | None = None  # train only on these labels, mapped to rows 0..k-1
    deadline_at: float | None = None  # time.monotonic() by which training must end (None: no limit)
    total_steps: int = 0  # steps this task trains (set by the trainer before `start`)
    # Where a method keeps what must outlive a task (Co-S²P's learned mask); the trainer child
    # sets it next to the device's artifact cache. None: nothing persists (tests, central training).
    state_dir: Path | None = None

    def __init__(self, assignment: Assignment, open_backend: BackendOpener) -> None:
        self.assignment: Assignment | None = assignment
        self.primary = open_backend(assignment.primary_key)

    @classmethod
    def plain(cls, backend: TrainingBackend) -> DeviceMethod:
        """Train `backend` as it is, with no assignment (central training, the calibration probe)."""
        method = cls.__new__(cls)
        method.assignment, method.primary = None, backend
        return method

    def start(self, weights: FloatArray | None, lr: float, rng: np.random.Generator) -> None:
        if weights is not None:
            self.primary.set_params(weights)
        self.primary.set_lr(lr)

    def before_step(self, step: int, feeds: MutableFeeds) -> TrainingBackend:
        return self.primary

    def after_step(self, step: int, backend: TrainingBackend, loss: float) -> None:
        return None

    def trained(self) -> FloatArray:
        return self.primary.get_params()

    def report(self) -> dict[str, float]:
        return {}

    def pack(self, received: FloatArray, trained: FloatArray, form: str) -> UpdateBody:
        values = trained - received if form == "delta" else trained
        return UpdateBody(form=form, values=values, report=self.report())


def check_table(method: str, table: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """[method] keys against the method's defaults: unknown keys are errors; returns merged."""
    unknown = sorted(set(table) - set(defaults))
    if unknown:
        known = ", ".join(defaults) or "none"
        raise ConfigError(f"[method] {method!r} has no key {unknown[0]!r}; it takes: {known}")
    return {**defaults, **table}


class MethodSpec(ABC):
    """A method's board-side description: name, [method] keys, profile grammar, artifacts."""

    name: ClassVar[str]
    param_defaults: ClassVar[Mapping[str, Any]] = {}
    # What [strategy] falls back to when a campaign names this method; [strategy] keys win.
    strategy_defaults: ClassVar[Mapping[str, Any]] = {}

    def params(self, table: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The method's parameters from a [method] table (without `name`); ConfigError names the key."""
        return self.check_params(check_table(self.name, table or {}, self.param_defaults))

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        return params

    @abstractmethod
    def parse_profile(self, text: str, params: Mapping[str, Any] | None) -> str:
        """The canonical form of `text`, or ConfigError naming what is wrong. `params=None`:
        the grammar only (a device, or inference, does not know the campaign's keys)."""

    def accepts(self, text: str) -> bool:
        try:
            self.parse_profile(text, None)
        except ConfigError:
            return False
        return True

    @abstractmethod
    def artifact_profiles(self, profile: str, params: Mapping[str, Any]) -> tuple[str, ...]:
        """Structural profiles (runtime.profile grammar) of the artifacts a device needs, the
        primary one (whose coordinates the task covers) first."""

    def extras(self, profile: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Assignment.extras for a task under `profile` (JSON values)."""
        return {}

    def auxiliary_artifacts(self, profile: str, params: Mapping[str, Any]) -> tuple[str, ...]:
        """Those of `artifact_profiles` that are no slice of the global model the server can name
        (a mask-learning graph, a device-specific slice): sent to devices, never scored."""
        return ()

    def global_profile(self, params: Mapping[str, Any]) -> str:
        """The artifact profile of the server's (served, evaluated) global model."""
        return "dense"

    def fleet_profiles(self, params: Mapping[str, Any], profiles: Sequence[str],
                       histograms: Sequence[Sequence[int]], groups: Mapping[str, int]) -> list[str]:
        """Each device's profile once the campaign knows its data (label histogram per device, in
        fleet order) and the model (channels per group in graph order, `classes` included): a
        method whose profiles depend on them (Chen & Qin's classes) fills them in; the others
        keep them."""
        return list(profiles)

    def proxy_samples(self, params: Mapping[str, Any]) -> int:
        """Samples of the proxy split the method's server half needs (0: none)."""
        return 0


class SliceSpec(MethodSpec):
    """Methods that train one slice of the global model named by a runtime.profile string."""

    allowed: ClassVar[frozenset[str]]  # Profile fields this method may set away from their default

    def structural(self, text: str, params: Mapping[str, Any] | None) -> Profile:
        p = parse_profile(text)
        window = (params or {}).get("window")
        if window is not None and p.width < 1.0 and "window=" not in text:
            p = replace(p, window=str(window))
        default = Profile()
        for name, _ in field_table(Profile):
            if name not in self.allowed and getattr(p, name) != getattr(default, name):
                raise ConfigError(f"method {self.name!r} does not take profile key {name!r} (profile {text!r})")
        return p

    def parse_profile(self, text: str, params: Mapping[str, Any] | None) -> str:
        return self.structural(text, params).canonical()

    def artifact_profiles(self, profile: str, params: Mapping[str, Any]) -> tuple[str, ...]:
        return (self.parse_profile(profile, params),)


class SliceDevice(DeviceMethod):
    def __init__(self, assignment: Assignment, open_backend: BackendOpener) -> None:
        super().__init__(assignment, open_backend)
        self.label_classes = parse_profile(assignment.profile).classes
