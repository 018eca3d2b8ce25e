"""Availability and CPU traces of emulated devices: step functions of time, pure and seeded.

Time `t_s` is seconds since the campaign started. Every trace is a right-continuous step
function (a value holds on [t_i, t_(i+1))), so `changes(until_s)` lists the value at t = 0
followed by each actual change with t <= until_s; `changes(until_s, since_s)` keeps only those
with since_s < t, which is what `TraceDriver` asks for on each tick. Random traces draw from
their own seeded generator and memoise what they have drawn, so answers never depend on the
order of the queries, and one seed gives one trace.

A campaign gives each trace as a TOML table; `make_availability` / `make_cpu_trace` read it
(unknown keys are ConfigErrors naming the key):
  availability  {kind="always"}
                {kind="markov", mean_on_s, mean_off_s, start="stationary"|"on"|"off", seed}
                    exponential dwell times; "stationary" (default) starts online with
                    p = on/(on+off), so the process looks the same at every t
                {kind="file", path, device, period_s}
  cpu           {kind="constant", value}                     fraction of the board's quota, (0, 1]
                {kind="random_walk", step_s, sigma, min, max, start, seed}
                    every step_s add N(0, sigma), clipped to [min, max]; start defaults to max
                {kind="step", at_s, before, after, until_s}
                    `before` until at_s, then `after` (e.g. the quota halves mid-campaign);
                    with until_s, back to `before` from until_s on
                {kind="file", path, device}
File formats and how a device is picked out of a file: `testbed.trace_files`. The `seed` given
to the factory (per device, from the runner) is mixed with the spec's optional `seed` and with
the trace's kind, so one device's availability and CPU traces never share random numbers.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from runtime.errors import ConfigError
from runtime.tomlconf import TomlTable
from testbed.trace_files import read_availability_file, read_cpu_file

V = TypeVar("V", bool, float)
MAX_SEED = 2**63 - 1
_STREAM = {"availability": 1, "cpu": 2, "link": 3}  # link: testbed.links (fraction of a link cap)
AVAILABILITY_KEYS: Mapping[str, frozenset[str]] = {
    "always": frozenset({"kind"}),
    "markov": frozenset({"kind", "mean_on_s", "mean_off_s", "start", "seed"}),
    "file": frozenset({"kind", "path", "device", "period_s"}),
}
CPU_KEYS: Mapping[str, frozenset[str]] = {
    "constant": frozenset({"kind", "value"}),
    "random_walk": frozenset({"kind", "step_s", "sigma", "min", "max", "start", "seed"}),
    "step": frozenset({"kind", "at_s", "before", "after", "until_s"}),
    "file": frozenset({"kind", "path", "device"}),
}
DAY_S = 86_400.0


class AvailabilityTrace(Protocol):
    def online_at(self, t_s: float) -> bool: ...
    def changes(self, until_s: float, since_s: float = -math.inf) -> list[tuple[float, bool]]: ...


class CpuTrace(Protocol):
    def value_at(self, t_s: float) -> float: ...
    def changes(self, until_s: float, since_s: float = -math.inf) -> list[tuple[float, float]]: ...


class _Steps(Generic[V]):
    """Shared query logic. Subclasses give breakpoints (times[0] == 0, consecutive values differ)
    complete up to at least `until_s`, and optionally a period after which they repeat."""

    period_s: float | None = None

    def _points(self, until_s: float) -> tuple[list[float], list[V]]:
        raise NotImplementedError

    def _at(self, t_s: float) -> V:
        t = max(0.0, t_s) % self.period_s if self.period_s else max(0.0, t_s)
        times, values = self._points(t)
        return values[bisect_right(times, t) - 1]

    def changes(self, until_s: float, since_s: float = -math.inf) -> list[tuple[float, V]]:
        if until_s < 0 or until_s <= since_s:
            return []
        if not self.period_s:
            times, values = self._points(until_s)
            lo, hi = bisect_right(times, since_s), bisect_right(times, until_s)
            return list(zip(times[lo:hi], values[lo:hi], strict=True))
        times, values = self._points(self.period_s)
        out: list[tuple[float, V]] = []
        first = max(0, math.floor(since_s / self.period_s)) if since_s > 0 else 0
        for k in range(first, math.floor(until_s / self.period_s) + 1):
            for i, (t, v) in enumerate(zip(times, values, strict=True)):
                if i == 0 and k > 0 and v == values[-1]:
                    continue  # the value carries over the period boundary: no change there
                at = t + k * self.period_s
                if since_s < at <= until_s:
                    out.append((at, v))
        return out


@dataclass(frozen=True)
class _Lazy(Generic[V]):
    """Breakpoints drawn so far by a random trace; only ever appended to, in drawing order."""

    times: list[float] = field(default_factory=list)
    values: list[V] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # generator and the time drawn up to


# ------------------------------------------------------------------------------ availability
@dataclass(frozen=True)
class AlwaysOnline(_Steps[bool]):
    def _points(self, until_s: float) -> tuple[list[float], list[bool]]:
        return [0.0], [True]

    def online_at(self, t_s: float) -> bool:
        return True


@dataclass(frozen=True)
class MarkovAvailability(_Steps[bool]):
    mean_on_s: float
    mean_off_s: float
    seed: int
    start: str = "stationary"  # "on" | "off" | "stationary"
    _drawn: _Lazy[bool] = field(default_factory=_Lazy, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (self.mean_on_s > 0 and self.mean_off_s > 0 and math.isfinite(self.mean_on_s + self.mean_off_s)):
            raise ConfigError(f"markov availability needs positive mean_on_s/mean_off_s, got "
                              f"{self.mean_on_s}/{self.mean_off_s}")
        if self.start not in ("on", "off", "stationary"):
            raise ConfigError(f"markov availability start must be on, off or stationary, got {self.start!r}")

    def _points(self, until_s: float) -> tuple[list[float], list[bool]]:
        d = self._drawn
        if not d.times:
            rng = np.random.default_rng(self.seed)
            p_on = self.mean_on_s / (self.mean_on_s + self.mean_off_s)
            online = self.start == "on" or (self.start == "stationary" and bool(rng.random() < p_on))
            d.times.append(0.0)
            d.values.append(online)
            d.state["rng"] = rng
        rng = d.state["rng"]
        # Keep one drawn breakpoint beyond until_s, so everything up to until_s is final.
        while d.times[-1] <= until_s:
            mean = self.mean_on_s if d.values[-1] else self.mean_off_s
            d.times.append(d.times[-1] + float(rng.exponential(mean)))
            d.values.append(not d.values[-1])
        return d.times, d.values

    def online_at(self, t_s: float) -> bool:
        return self._at(t_s)


@dataclass(frozen=True)
class FileAvailability(_Steps[bool]):
    times: tuple[float, ...]
    values: tuple[bool, ...]
    period_s: float | None = None

    def _points(self, until_s: float) -> tuple[list[float], list[bool]]:
        return list(self.times), list(self.values)

    def online_at(self, t_s: float) -> bool:
        return self._at(t_s)


# ------------------------------------------------------------------------------------- CPU
@dataclass(frozen=True)
class ConstantCpu(_Steps[float]):
    value: float

    def __post_init__(self) -> None:
        _check_fraction(self.value, "constant CPU trace value")

    def _points(self, until_s: float) -> tuple[list[float], list[float]]:
        return [0.0], [self.value]

    def value_at(self, t_s: float) -> float:
        return self.value


@dataclass(frozen=True)
class RandomWalkCpu(_Steps[float]):
    step_s: float
    sigma: float
    min: float
    max: float
    seed: int
    start: float | None = None  # None = max: a device starts with its whole quota
    _drawn: _Lazy[float] = field(default_factory=_Lazy, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_fraction(self.min, "random_walk min")
        _check_fraction(self.max, "random_walk max")
        if self.min > self.max:
            raise ConfigError(f"random_walk min {self.min} is above max {self.max}")
        if not (self.step_s > 0 and math.isfinite(self.step_s)) or not (0 <= self.sigma < math.inf):
            raise ConfigError(f"random_walk needs step_s > 0 and sigma >= 0, got {self.step_s}, {self.sigma}")
        if self.start is not None and not self.min <= self.start <= self.max:
            raise ConfigError(f"random_walk start {self.start} is outside [min, max] = [{self.min}, {self.max}]")

    def _points(self, until_s: float) -> tuple[list[float], list[float]]:
        d = self._drawn
        if not d.times:
            d.times.append(0.0)
            d.values.append(self.max if self.start is None else self.start)
            d.state.update(rng=np.random.default_rng(self.seed), k=0, value=d.values[0])
        rng = d.state["rng"]
        # Clipping (not reflecting) is deliberate: a device often sits at its whole quota.
        while d.state["k"] * self.step_s <= until_s:
            d.state["k"] += 1
            value = min(self.max, max(self.min, d.state["value"] + float(rng.normal(0.0, self.sigma))))
            d.state["value"] = value
            if value != d.values[-1]:
                d.times.append(d.state["k"] * self.step_s)
                d.values.append(value)
        return d.times, d.values

    def value_at(self, t_s: float) -> float:
        return self._at(t_s)


@dataclass(frozen=True)
class FileCpu(_Steps[float]):
    times: tuple[float, ...]
    values: tuple[float, ...]

    def _points(self, until_s: float) -> tuple[list[float], list[float]]:
        return list(self.times), list(self.values)

    def value_at(self, t_s: float) -> float:
        return self._at(t_s)


@dataclass(frozen=True)
class StepCpu(_Steps[float]):
    at_s: float
    before: float
    after: float
    until_s: float | None = None  # None: `after` holds to the end

    def __post_init__(self) -> None:
        _check_fraction(self.before, "step CPU trace before")
        _check_fraction(self.after, "step CPU trace after")
        if not (self.at_s > 0 and math.isfinite(self.at_s)) or (self.until_s is not None and self.until_s <= self.at_s):
            raise ConfigError(f"step CPU trace needs 0 < at_s < until_s, got at_s {self.at_s}, until_s {self.until_s}")

    def _points(self, until_s: float) -> tuple[list[float], list[float]]:
        if self.after == self.before:
            return [0.0], [self.before]
        times, values = [0.0, self.at_s], [self.before, self.after]
        if self.until_s is not None:
            times.append(self.until_s)
            values.append(self.before)
        return times, values

    def value_at(self, t_s: float) -> float:
        return self._at(t_s)


def _check_fraction(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{what} must be a fraction of the board's CPU quota in (0, 1], got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------- factory
def _mixed_seed(seed: int, spec_seed: int, stream: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"trace seed {seed!r} must be an integer in [0, 2**63)")
    state = np.random.SeedSequence([seed, spec_seed, _STREAM[stream]]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def _table(spec: Mapping[str, Any], kinds: Mapping[str, frozenset[str]], source: str, table: str) -> TomlTable:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{source}: [{table}] must be a table, got {type(spec).__name__}")
    only_kind = {k: v for k, v in spec.items() if k == "kind"}
    kind = TomlTable(source, table, only_kind, frozenset({"kind"})).string("kind", tuple(kinds))
    return TomlTable(source, table, spec, kinds[kind])  # a key of another kind is unknown here


def _file_path(t: TomlTable, base_dir: str | Path) -> Path:
    path = Path(t.string("path"))
    return path if path.is_absolute() else Path(base_dir) / path


def make_availability(spec: Mapping[str, Any], *, seed: int, base_dir: str | Path, device: str | None = None,
                      index: int | None = None, source: str = "campaign",
                      table: str = "availability") -> AvailabilityTrace:
    """The availability trace a campaign table describes. `seed` is the device's own; `device`
    and `index` pick its row of a multi-device file; `source`/`table` name the spec in errors."""
    t = _table(spec, AVAILABILITY_KEYS, source, table)
    kind = t.string("kind")
    if kind == "always":
        return AlwaysOnline()
    if kind == "markov":
        return MarkovAvailability(
            mean_on_s=t.number("mean_on_s", 0.0, 365 * DAY_S, lo_open=True),
            mean_off_s=t.number("mean_off_s", 0.0, 365 * DAY_S, lo_open=True),
            seed=_mixed_seed(seed, t.integer("seed", 0, MAX_SEED, default=0), "availability"),
            start=t.string("start", ("stationary", "on", "off"), default="stationary"),
        )
    times, values, period = read_availability_file(
        _file_path(t, base_dir), chosen=t.optional_string("device"), device=device, index=index,
        period_s=t.optional_number("period_s", 0.0, 365 * DAY_S, lo_open=True))
    return FileAvailability(times, values, period)


def make_cpu_trace(spec: Mapping[str, Any], *, seed: int, base_dir: str | Path, device: str | None = None,
                   index: int | None = None, source: str = "campaign", table: str = "cpu",
                   stream: str = "cpu") -> CpuTrace:
    """The CPU-fraction trace a campaign table describes (arguments as `make_availability`); a link's
    bandwidth trace (testbed.links) is the same kinds on its own random `stream`."""
    t = _table(spec, CPU_KEYS, source, table)
    kind = t.string("kind")
    if kind == "constant":
        return ConstantCpu(t.number("value", 0.0, 1.0, lo_open=True))
    if kind == "random_walk":
        lo = t.number("min", 0.0, 1.0, lo_open=True)
        hi = t.number("max", 0.0, 1.0, lo_open=True)
        if lo > hi:
            raise t.fail(f"[{table}] min {lo} is above max {hi}")
        return RandomWalkCpu(
            step_s=t.number("step_s", 0.0, DAY_S, lo_open=True),
            sigma=t.number("sigma", 0.0, 1.0),
            min=lo, max=hi,
            seed=_mixed_seed(seed, t.integer("seed", 0, MAX_SEED, default=0), stream),
            start=t.optional_number("start", lo, hi),
        )
    if kind == "step":
        at_s = t.number("at_s", 0.0, DAY_S, lo_open=True)
        until = t.optional_number("until_s", at_s, DAY_S)
        return StepCpu(at_s, t.number("before", 0.0, 1.0, lo_open=True), t.number("after", 0.0, 1.0, lo_open=True),
                       until)
    times, values = read_cpu_file(_file_path(t, base_dir), chosen=t.optional_string("device"), device=device,
                                  index=index)
    return FileCpu(times, values)


# ---------------------------------------------------------------------------------- driver
@dataclass(frozen=True)
class TraceEvent:
    t_s: float  # trace time of the change (seconds since start), not when it was applied
    device: str
    kind: str  # "online" | "cpu"
    value: bool | float


class TraceDriver:
    """Applies trace changes through callbacks; pure scheduling, no threads, no sleeping.

    The campaign runner calls `step()` from its loop. Trace time is `clock() - start`, where
    `start` defaults to the clock at the first step, so the first step applies every device's
    state at t = 0. Each step calls the callbacks, in time order, for every change in
    (previous step, now]: a device that went off and on again between two steps is frozen and
    thawed, so the event log (the returned TraceEvents) keeps even short outages. A callback
    that raises propagates; the rest of that step's events are then not applied.
    """

    def __init__(self, availability: Mapping[str, AvailabilityTrace], cpu: Mapping[str, CpuTrace],
                 set_online: Callable[[str, bool], None], set_cpu_fraction: Callable[[str, float], None],
                 *, clock: Callable[[], float] = time.monotonic, start: float | None = None) -> None:
        self.availability, self.cpu = dict(availability), dict(cpu)
        self._set_online, self._set_cpu = set_online, set_cpu_fraction
        self._clock, self.start = clock, start
        self._last_t_s = -math.inf
        self.online: dict[str, bool] = {}  # last state applied, per device
        self.cpu_fraction: dict[str, float] = {}

    def step(self, now: float | None = None) -> list[TraceEvent]:
        """Apply the changes due up to `now` (a reading of the clock; default: read it)."""
        now = self._clock() if now is None else now
        if self.start is None:
            self.start = now
        t_s = now - self.start
        if t_s < self._last_t_s:
            return []  # the clock went backwards: nothing new is due
        events = [TraceEvent(t, dev, "online", v) for dev, tr in self.availability.items()
                  for t, v in tr.changes(t_s, self._last_t_s)]
        events += [TraceEvent(t, dev, "cpu", v) for dev, tr in self.cpu.items()
                   for t, v in tr.changes(t_s, self._last_t_s)]
        # Online before cpu at equal times: a device coming back gets its quota right after.
        events.sort(key=lambda e: (e.t_s, e.kind != "online", e.device))
        self._last_t_s = t_s
        for e in events:
            if e.kind == "online":
                self._set_online(e.device, bool(e.value))
                self.online[e.device] = bool(e.value)
            else:
                self._set_cpu(e.device, float(e.value))
                self.cpu_fraction[e.device] = float(e.value)
        return events
