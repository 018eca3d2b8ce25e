"""Wasted work: device-seconds spent on tasks whose update was refused or abandoned.

One definition for the simulator, the report of a campaign and the federation, computed from
the engine's log events (`task_sent`, `update_accepted`, `update_rejected`, `task_abandoned`):

- a task's device-seconds run from its dispatch to the moment it was settled: its update was
  accepted (*useful*), or refused (*wasted*), or the task was abandoned (*wasted*; a straggler
  dropped at a deadline keeps training, so if its late update arrives and is refused, the waste
  runs to that refusal), less the time the device was offline meanwhile (from `device_offline`
  or the campaign's `availability` going off, to its next `device_hello` or `availability`
  coming on, whichever is seen first): an offline device does no work;
- a task still out when the run stops (`finished`, `server_stop` or the campaign runner's
  `campaign_stopping`, whichever comes first) is *unfinished*: neither useful nor wasted;
- `wasted_fraction = wasted / (useful + wasted)`;
- `wasted_energy_j`: the energy refused updates reported (a task abandoned whose update never
  arrived reported none).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from server.events import EventName

E = EventName
END_EVENTS = (E.FINISHED, E.SERVER_STOP, E.CAMPAIGN_STOPPING)
_TASK_EVENTS = frozenset({E.TASK_SENT, E.UPDATE_ACCEPTED, E.UPDATE_REJECTED, E.TASK_ABANDONED})


@dataclass
class DeviceWork:
    useful_s: float = 0.0
    wasted_s: float = 0.0
    unfinished_s: float = 0.0
    tasks_wasted: int = 0
    wasted_energy_j: float = 0.0


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
    def wasted_energy_j(self) -> float:
        return sum(d.wasted_energy_j for d in self.devices.values())

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
    offline_since: dict[str, float] = {}  # devices offline now -> since when
    offline_s: dict[str, float] = {}  # device -> offline seconds before its current spell

    def offline_until(device: str, t: float) -> float:
        """The device's cumulative offline seconds up to `t`."""
        ongoing = t - offline_since[device] if device in offline_since else 0.0
        return offline_s.get(device, 0.0) + max(0.0, ongoing)

    sent_offline: dict[tuple[str, str], float] = {}  # task -> the device's offline seconds at dispatch
    end: float | None = None
    for e in events:
        kind, t = e.get("event"), _time(e, time_key)
        if t is None or not isinstance(kind, str):
            continue
        if kind in END_EVENTS:
            end = t
            break
        device, task_id = e.get("device"), e.get("task_id")
        if not isinstance(device, str):
            continue
        went_offline = kind == E.DEVICE_OFFLINE or (kind == E.AVAILABILITY and e.get("online") is False)
        came_back = kind == E.DEVICE_HELLO or (kind == E.AVAILABILITY and e.get("online") is True)
        if went_offline and device not in offline_since:
            offline_since[device] = t
        elif came_back and device in offline_since:
            offline_s[device] = offline_until(device, t)
            del offline_since[device]
        if not isinstance(task_id, str) or kind not in _TASK_EVENTS:  # device_status carries task ids too
            continue
        key = (device, task_id)
        work = out.devices.setdefault(device, DeviceWork())
        if kind == E.TASK_SENT:
            sent[key], sent_offline[key] = t, offline_until(device, t)
            continue
        if kind == E.UPDATE_REJECTED and (key in sent or key in abandoned):
            energy_j = e.get("energy_j")
            if isinstance(energy_j, (int, float)) and not isinstance(energy_j, bool):
                work.wasted_energy_j += float(energy_j)
        if key in sent:
            busy_s = t - sent.pop(key) - (offline_until(device, t) - sent_offline.pop(key))
            if kind == E.UPDATE_ACCEPTED:
                work.useful_s += busy_s
            elif kind in (E.UPDATE_REJECTED, E.TASK_ABANDONED):
                work.tasks_wasted += 1
                work.wasted_s += busy_s
                if kind == E.TASK_ABANDONED:
                    abandoned[key] = (t, offline_until(device, t))
        elif kind == E.UPDATE_REJECTED and key in abandoned:
            # The late update of an abandoned task: the device worked on it until now.
            until, offline_then = abandoned.pop(key)
            work.wasted_s += t - until - (offline_until(device, t) - offline_then)
    if end is not None:
        for key, start in sent.items():
            busy_s = end - start - (offline_until(key[0], end) - sent_offline[key])
            out.devices.setdefault(key[0], DeviceWork()).unfinished_s += max(0.0, busy_s)
    return out

