"""Wasted work: device-seconds spent on tasks whose update was refused or abandoned.

One definition for the simulator, the report of a campaign and the federation, computed from
the engine's log events (`task_sent`, `update_accepted`, `update_rejected`, `task_abandoned`):

- a task's device-seconds run from its dispatch to the moment it was settled: its update was
  accepted (*useful*), or refused (*wasted*), or the task was abandoned (*wasted*; a straggler
  dropped at a deadline keeps training, so if its late update arrives and is refused, the waste
  runs to that refusal);
- a task still out when the run stops (`finished`, `server_stop` or the campaign runner's
  `campaign_stopping`, whichever comes first) is *unfinished*: neither useful nor wasted;
- `wasted_fraction = wasted / (useful + wasted)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

END_EVENTS = ("finished", "server_stop", "campaign_stopping")


@dataclass
class DeviceWork:
    useful_s: float = 0.0
    wasted_s: float = 0.0
    unfinished_s: float = 0.0
    tasks_wasted: int = 0


@dataclass
class WorkSummary:
    devices: dict[str, DeviceWork] = field(default_factory=dict)

    @property
    def useful_s(self) -> float:
        return sum(d.useful_s for d in self.devices.values())

    @property
    def wasted_s(self) -> float:
        return sum(d.wasted_s for d in self.devices.values())

    @property
    def wasted_fraction(self) -> float | None:
        spent = self.useful_s + self.wasted_s
        return self.wasted_s / spent if spent > 0 else None


def _time(event: Mapping[str, Any], key: str) -> float | None:
    value = event.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def work_summary(events: Iterable[Mapping[str, Any]], time_key: str = "t") -> WorkSummary:
    """Useful, wasted and unfinished device-seconds per device, from log events in log order.
    `time_key` names the clock: "t" (the engine's) or "wall_t" (every line of events.jsonl)."""
    out = WorkSummary()
    sent: dict[tuple[str, str], float] = {}  # outstanding: (device, task) -> dispatch time
    abandoned: dict[tuple[str, str], tuple[float, float]] = {}  # -> (dispatch time, charged until)
    end: float | None = None
    for e in events:
        kind, t = e.get("event"), _time(e, time_key)
        if t is None or not isinstance(kind, str):
            continue
        if kind in END_EVENTS:
            end = t
            break
        device, task_id = e.get("device"), e.get("task_id")
        if not isinstance(device, str) or not isinstance(task_id, str):
            continue
        key = (device, task_id)
        work = out.devices.setdefault(device, DeviceWork())
        if kind == "task_sent":
            sent[key] = t
        elif kind == "update_accepted" and key in sent:
            work.useful_s += t - sent.pop(key)
        elif kind in ("update_rejected", "task_abandoned") and key in sent:
            start = sent.pop(key)
            work.tasks_wasted += 1
            work.wasted_s += t - start
            if kind == "task_abandoned":
                abandoned[key] = (start, t)
        elif kind == "update_rejected" and key in abandoned:
            # The late update of an abandoned task: the device worked on it until now.
            start, until = abandoned.pop(key)
            work.wasted_s += t - until
    if end is not None:
        for (device, _), start in sent.items():
            out.devices.setdefault(device, DeviceWork()).unfinished_s += max(0.0, end - start)
    return out

