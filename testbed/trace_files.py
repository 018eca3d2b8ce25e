"""Trace files for `testbed.traces`: parsing and validation, one device picked out of a file.

Availability (FedScale's `client_behave_trace` shape; intervals are half-open [s, e)):
  JSON / TOML, one device  {"active": [[s, e], ...]} and/or {"inactive": [[s, e], ...]}
                           or FedScale's own {"active": [s...], "inactive": [e...], "finish_time": T}
                           (a FedScale pickle converts with `json.dump(pickle.load(f)[client_id])`)
  many devices             {"devices": {"<name>": <one device as above>, ...}}
  CSV                      header `device,start_s,end_s,state` (device optional), state active|inactive
With `active` intervals a device is online only inside them (`inactive` ones, if also given,
must not overlap them); with only `inactive` ones it is online outside them. `finish_time`
(or the spec's period_s) repeats the trace: FedScale's "active iff active[i] <= t % finish_time
<= inactive[i]". Each list must be sorted and non-overlapping; negative times, start >= end and
overlaps are ConfigErrors naming the file, the device and the interval (with its CSV line or
list index).

CPU (fraction of the board's quota in (0, 1]): CSV `device,time_s,value` (device optional), or
JSON/TOML {"points": [[t, v], ...]} or {"devices": {"<name>": [[t, v], ...]}}. Times strictly
increase; the first value also holds before the first time.

Which device: the spec's `device`, else the emulated device's own name if the file has it, else
the `index`-th device of the file (mod its size), so a FedScale file of thousands of clients maps
onto any fleet; a file with one device needs none of these.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from runtime.errors import ConfigError

V = TypeVar("V", bool, float)
AvailabilitySteps = tuple[tuple[float, ...], tuple[bool, ...], float | None]
CpuSteps = tuple[tuple[float, ...], tuple[float, ...]]


def _normalise(points: list[tuple[float, V]], initial: V) -> tuple[list[float], list[V]]:
    """Breakpoints from (time, value) points: sorted, last one wins at equal times, repeats dropped."""
    last_at: dict[float, V] = {0.0: initial}
    for t, v in sorted(points, key=lambda p: p[0]):
        last_at[t] = v
    times: list[float] = []
    values: list[V] = []
    for t, v in sorted(last_at.items()):
        if not values or v != values[-1]:
            times.append(t)
            values.append(v)
    return times, values


class _CsvRows(list[list[str]]):
    """Rows of a CSV file, told apart from a JSON document that is a list."""


@functools.lru_cache(maxsize=8)
def _read_document(path: str, _mtime_ns: int) -> Any:
    """A parsed trace file; cached (by mtime) because a fleet reads one file once per device."""
    p = Path(path)
    try:
        if p.suffix == ".csv":
            with p.open(newline="") as f:
                return _CsvRows(csv.reader(f))
        if p.suffix == ".toml":
            with p.open("rb") as f:
                return tomllib.load(f)
        if p.suffix == ".json":
            return json.loads(p.read_text())
    except (OSError, ValueError) as exc:  # tomllib and json errors are ValueErrors
        raise ConfigError(f"{path}: cannot read trace file: {exc}") from None
    raise ConfigError(f"{path}: trace files must end in .csv, .json or .toml")


def _load(path: Path) -> Any:
    try:
        return _read_document(str(path), path.stat().st_mtime_ns)
    except FileNotFoundError:
        raise ConfigError(f"{path}: trace file not found") from None


def _csv_rows(path: Path, rows: list[list[str]], columns: tuple[str, ...]) -> dict[str, list[tuple[str, list[str]]]]:
    """CSV rows grouped by device (column optional): {device: [("line N", values), ...]}."""
    if not rows:
        raise ConfigError(f"{path}: empty trace file (header {','.join(columns)} expected)")
    header = [h.strip() for h in rows[0]]
    if header not in (list(columns), ["device", *columns]):
        raise ConfigError(f"{path}: header {','.join(header)!r}; expected [device,]{','.join(columns)}")
    by_device: dict[str, list[tuple[str, list[str]]]] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != len(header):
            raise ConfigError(f"{path}: line {n} has {len(row)} fields, the header {len(header)}")
        dev = row[0].strip() if header[0] == "device" else ""
        by_device.setdefault(dev, []).append((f"line {n}", [c.strip() for c in row[-len(columns):]]))
    return by_device


def _num(path: Path, device: str, where: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"{path}: device {device!r}: {where}: {value!r} is not a finite number")
    return number


def _pick(path: Path, per_device: Mapping[str, Any], chosen: str | None, device: str | None,
          index: int | None) -> tuple[str, Any]:
    if chosen is not None:
        if chosen not in per_device:
            raise ConfigError(f"{path}: no device {chosen!r} in the trace file")
        return chosen, per_device[chosen]
    if device is not None and device in per_device:
        return device, per_device[device]
    names = list(per_device)
    if not names:
        raise ConfigError(f"{path}: the trace file holds no device traces")
    if names == [""]:  # a file with one unnamed device: errors name the device it stands for
        return device or "(the file's only device)", per_device[""]
    if index is not None:
        return names[index % len(names)], per_device[names[index % len(names)]]
    if len(names) == 1:
        return names[0], per_device[names[0]]
    raise ConfigError(f"{path}: holds {len(names)} devices; say which with `device` in the trace spec")


Interval = tuple[float, float, bool, str]  # start, end, active?, where in the file


def _check_intervals(path: Path, device: str, intervals: list[Interval], period_s: float | None) -> None:
    def show(iv: Interval) -> str:
        return f"{'active' if iv[2] else 'inactive'} interval [{iv[0]:g}, {iv[1]:g}) ({iv[3]})"

    for iv in intervals:
        if iv[0] < 0 or iv[1] < 0:
            raise ConfigError(f"{path}: device {device!r}: {show(iv)} has a negative time")
        if iv[0] >= iv[1]:
            raise ConfigError(f"{path}: device {device!r}: {show(iv)} has start >= end")
        if period_s is not None and iv[1] > period_s:
            raise ConfigError(f"{path}: device {device!r}: {show(iv)} ends after the period {period_s:g} s")
    for state in (True, False):  # each list in the file's own order
        same = [iv for iv in intervals if iv[2] == state]
        for prev, iv in itertools.pairwise(same):
            if iv[0] < prev[0]:
                raise ConfigError(f"{path}: device {device!r}: {show(iv)} is out of order (after {show(prev)})")
    ordered = sorted(intervals, key=lambda iv: iv[0])
    for prev, iv in itertools.pairwise(ordered):
        if iv[0] < prev[1]:
            raise ConfigError(f"{path}: device {device!r}: {show(iv)} overlaps {show(prev)}")


def _device_intervals(path: Path, device: str, doc: Any) -> tuple[list[Interval], float | None]:
    if not isinstance(doc, Mapping) or not {"active", "inactive"} & set(doc):
        raise ConfigError(f"{path}: device {device!r}: expected a table with 'active' and/or 'inactive'")
    unknown = set(doc) - {"active", "inactive", "finish_time", "duration", "model"}  # FedScale's keys
    if unknown:
        raise ConfigError(f"{path}: device {device!r}: unknown key(s) {', '.join(sorted(unknown))}")
    period = _num(path, device, "finish_time", doc["finish_time"]) if "finish_time" in doc else None
    lists = {k: doc.get(k, []) for k in ("active", "inactive")}
    if not all(isinstance(v, list) for v in lists.values()):
        raise ConfigError(f"{path}: device {device!r}: 'active' and 'inactive' must be lists")
    flat = [x for v in lists.values() for x in v]
    if flat and not any(isinstance(x, list) for x in flat):  # FedScale: start times, end times
        starts, ends = lists["active"], lists["inactive"]
        if len(starts) != len(ends):
            raise ConfigError(f"{path}: device {device!r}: {len(starts)} active times but {len(ends)} inactive")
        return [(_num(path, device, f"active[{i}]", s), _num(path, device, f"inactive[{i}]", e), True,
                 f"active[{i}]") for i, (s, e) in enumerate(zip(starts, ends, strict=True))], period
    out: list[Interval] = []
    for key, items in lists.items():
        for i, item in enumerate(items):
            if not isinstance(item, list) or len(item) != 2:
                raise ConfigError(f"{path}: device {device!r}: {key}[{i}] = {item!r} is not a [start, end] pair")
            where = f"{key}[{i}]"
            out.append((_num(path, device, where, item[0]), _num(path, device, where, item[1]), key == "active", where))
    return out, period


def read_availability_file(path: Path, *, chosen: str | None = None, device: str | None = None,
                           index: int | None = None, period_s: float | None = None) -> AvailabilitySteps:
    """One device's availability as breakpoints (times, online?, period_s or None)."""
    doc = _load(path)
    if isinstance(doc, _CsvRows):
        per: dict[str, Any] = _csv_rows(path, doc, ("start_s", "end_s", "state"))
    else:
        per = doc["devices"] if isinstance(doc, Mapping) and "devices" in doc else {"": doc}
        if not isinstance(per, Mapping):
            raise ConfigError(f"{path}: 'devices' must map device names to traces")
    name, entry = _pick(path, per, chosen, device, index)
    if isinstance(doc, _CsvRows):
        intervals: list[Interval] = []
        for where, (s, e, state) in entry:
            if state not in ("active", "inactive"):
                raise ConfigError(f"{path}: device {name!r}: {where}: state {state!r} is not active or inactive")
            intervals.append((_num(path, name, where, s), _num(path, name, where, e), state == "active", where))
        period = None
    else:
        intervals, period = _device_intervals(path, name, entry)
    period = period_s if period_s is not None else period
    if period is not None and period <= 0:
        raise ConfigError(f"{path}: device {name!r}: period {period} s must be positive")
    _check_intervals(path, name, intervals, period)
    has_active = any(iv[2] for iv in intervals)
    # Online inside active intervals when there are any, else outside the inactive ones.
    points = [pt for iv in intervals if iv[2] == has_active for pt in ((iv[0], has_active), (iv[1], not has_active))]
    times, values = _normalise(points, initial=not has_active)
    if period is not None:  # a change at the period's end is the next period's start
        keep = [i for i, t in enumerate(times) if t < period]
        times, values = [times[i] for i in keep], [values[i] for i in keep]
    return tuple(times), tuple(values), period


def read_cpu_file(path: Path, *, chosen: str | None = None, device: str | None = None,
                  index: int | None = None) -> CpuSteps:
    """One device's CPU fraction as breakpoints (times, values)."""
    doc = _load(path)
    if isinstance(doc, _CsvRows):
        per: Mapping[str, Any] = _csv_rows(path, doc, ("time_s", "value"))
    elif isinstance(doc, Mapping) and isinstance(doc.get("devices"), Mapping):
        per = {d: [(f"devices.{d}[{i}]", p) for i, p in enumerate(pts)] for d, pts in doc["devices"].items()}
    elif isinstance(doc, Mapping) and isinstance(doc.get("points"), list):
        per = {"": [(f"points[{i}]", p) for i, p in enumerate(doc["points"])]}
    else:
        raise ConfigError(f"{path}: a CPU trace needs 'points' = [[t, v], ...] or a 'devices' table")
    name, rows = _pick(path, per, chosen, device, index)
    times: list[float] = []
    values: list[float] = []
    for where, pair in rows:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ConfigError(f"{path}: device {name!r}: {where}: {pair!r} is not a [time_s, value] pair")
        t, v = _num(path, name, where, pair[0]), _num(path, name, where, pair[1])
        if t < 0 or (times and t <= times[-1]):
            raise ConfigError(f"{path}: device {name!r}: {where}: time {t:g} is negative or not after the previous")
        if not 0 < v <= 1:
            raise ConfigError(f"{path}: device {name!r}: {where}: value {v:g} is outside (0, 1]")
        times.append(t)
        values.append(v)
    if not times:
        raise ConfigError(f"{path}: device {name!r}: no points")
    t_out, v_out = _normalise(list(zip(times, values, strict=True)), initial=values[0])
    return tuple(t_out), tuple(v_out)
