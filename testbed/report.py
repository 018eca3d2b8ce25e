"""The report of one run folder: `summary.json`, `plots/*.png` and a self-contained `report.html`.

`load_run` reads what the server and the campaign runner left (events.jsonl, server.csv,
devices/<id>.csv, and fleet.json / config.toml when present); `summarise` turns it into the
headline figures; `write_report` writes everything. Partial runs (Ctrl-C, SIGKILL: short or
half-written files) are reported for what ran; unreadable lines are counted, not fatal.

Clock: every time is in board seconds since the campaign start, the one base that events.jsonl
(`t`), server.csv (`t_s`) and devices/<id>.csv (`t_s`) share; under time dilation a board second
is `dilation` wall seconds (fleet.json). Events before the start (set-up) get negative times.
`duration_board_s` of the run is the time of its last event, in board seconds too (summaries
written before it had that name call it `wall_s`: `duration_board_s()` reads either).

Definitions (also written into summary.json under "definitions"):
- A *round* is the span between two aggregations; the first starts at the first `task_sent`.
  The updates merged in a round are the `update_accepted` events logged after the previous
  `aggregated` event and before its own (exactly the engine's pending list).
- time_to_target_s: time of the aggregation that published the first version whose accuracy
  reached config.toml's [stop] target_accuracy (server.csv t_s; null without a target).
- utilization (Co-S²P, methods.md §1.3): `U = Σ_i train_s_i / (N · T)`, with `train_s_i` the
  device-reported training time of every update merged into a published version, N the number
  of devices in the fleet (fleet.json, else every device seen in the run), and T the time from
  the first dispatch to the last aggregation (= Σ of the round lengths). Per round, the same
  ratio over that round's updates and length.
- device train_s: Σ device-reported `train_s` of its accepted updates (the time its trainer
  worked on tasks that counted); `timeline_training_s` is the time in the 'training' state.
- idle_s / offline_s: time in idle|online / offline state on the timeline built from
  device_status, device_hello, device_offline, device_exit (failed) and availability events,
  until the last event.
- device energy_j: telemetry's cumulative energy at its last sample; a drop (agent restart)
  starts a new segment whose energy is added.
- energy per round: `energy_j_updates` is Σ of the merged updates' `energy_j` (training only);
  `energy_j_telemetry` is the whole fleet's telemetry energy (idle included) between the round's
  start and end, interpolated between samples (a trace is flat outside its samples; None
  when no device has two samples).
- energy_to_target_j: the whole fleet's telemetry energy (idle included) from each device's start
  up to time_to_target_s (null when the target was not reached).
- bytes per round: `bytes_down` is every task and artifact frame the server sent, `bytes_up` every
  update frame it received (refused ones too), after the previous aggregation and up to this one;
  counted as the MQTT payloads the broker carried (the frame plus its chunk headers).
- accuracy per profile: the server scores the global model and, at every version, each fixed
  submodel profile (a width or class subset; rolling windows move each round) on the held-out split.
  `served_profile` is the model the run serves: the global model ("dense") when some device trains
  all of it (dense, or a rolling window that visits every channel), else the widest submodel any
  device trains (an untrained part of the model is not scored). final_accuracy, best_accuracy and
  time_to_target_s are those of the served model.
- groups (tiers: one [[fleet]] group each): the accuracy of the model the group trains (its
  profile's, the global model's for dense or rolling), its devices' updates, train_s, energy_j,
  peak_rss_mb (telemetry, agent + trainer), step_ms_median (median over its updates'
  device-reported median step times: a step that fits in one CFS quota burst runs at host speed,
  so this shows the host's step, not the board's) and task_step_ms_median (median over its
  updates of train_s / local_steps: the board's average step, throttling included).
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tomllib

from runtime.errors import ConfigError
from server.events import EventName
from server.waste import WorkSummary, work_summary
from testbed.fidelity import check as check_fidelity

log = logging.getLogger("orchard.report")

FloatArray = npt.NDArray[np.float64]
STATES = ("training", "uploading", "idle", "online", "offline", "failed")


@dataclass
class Segment:
    state: str
    start_s: float
    end_s: float


@dataclass
class Update:
    device: str
    task_id: str
    t_s: float
    train_s: float
    energy_j: float
    staleness: int
    profile: str | None
    version: int | None = None  # the version it was merged into; None = never merged
    step_ms_median: float | None = None
    loss_last: float | None = None  # training loss at the end of the task


@dataclass
class Round:
    version: int
    t_s: float  # end of the round: its aggregation
    accuracy: float | None = None
    loss: float | None = None
    start_s: float | None = None
    n_updates: int = 0
    train_s: float = 0.0
    energy_j_updates: float = 0.0
    energy_j_telemetry: float | None = None
    utilization: float | None = None
    logged: bool = False  # its `aggregated` event was read, so its updates are known
    bytes_up: int = 0
    bytes_down: int = 0
    train_loss: float | None = None  # sample-unweighted mean of the merged updates' loss_last
    profile_accuracy: dict[str, float] = field(default_factory=dict)


@dataclass
class Trace:
    """One device's telemetry, columns as arrays, time in board seconds since the campaign start."""

    t_s: FloatArray
    cpu_pct: FloatArray
    rss_agent_mb: FloatArray
    rss_trainer_mb: FloatArray
    mem_limit_mb: FloatArray  # nan where the device has no limit
    energy_j: FloatArray  # cumulative, corrected for agent restarts
    power_source: str


@dataclass
class RunData:
    run_dir: Path
    campaign: str
    strategy: str | None
    fleet: dict[str, Any] | None
    config_text: str | None
    target_accuracy: float | None
    devices: list[str]
    boards: dict[str, str]
    groups: dict[str, str]  # device -> [[fleet]] group (fleet.json), else its board
    end_s: float
    rounds: list[Round]
    updates: list[Update]
    rejected: int
    timeline: dict[str, list[Segment]]
    ooms: dict[str, list[tuple[float, int]]]  # device -> (t_s, cumulative oom_kills)
    traces: dict[str, Trace]
    stop_reason: str | None
    warnings: list[str] = field(default_factory=list)
    bytes_up: int = 0  # whole run
    bytes_down: int = 0
    last_profile: dict[str, str] = field(default_factory=dict)  # device -> profile of its last task
    local_steps: int | None = None  # steps per task, when config.toml's [train] fixes them
    work: WorkSummary = field(default_factory=WorkSummary)  # wasted device-seconds (server/waste.py)
    never_joined: list[dict[str, str]] = field(default_factory=list)  # {id, reason}
    nodes_lost: list[dict[str, Any]] = field(default_factory=list)  # {node, t_s, devices}: a cluster run's lost hosts


def _num(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _read_events(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    events, bad = [], 0
    with path.open(errors="replace") as f:
        for line in f:
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                bad += line.strip() != ""
                continue
            if isinstance(e, dict) and isinstance(e.get("event"), str) and _num(e.get("t")) is not None:
                events.append(e)
            else:
                bad += 1
    if bad:
        warnings.append(f"events.jsonl: skipped {bad} unreadable line(s) (a run cut short?)")
    # Stable within a millisecond, the resolution service-written events carry (`t` rounded to 3
    # places) while engine events carry the exact clock: an update_accepted at 1.6377 was sorted
    # before its update_received at 1.638 and the report lost that update's step_ms_median.
    return sorted(events, key=lambda e: round(float(e["t"]), 3))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", errors="replace") as f:
        return [row for row in csv.DictReader(f) if None not in row.values()]  # drops a half-written last line


def _read_trace(path: Path) -> Trace | None:
    rows = [r for r in _read_csv(path) if _num(r.get("t_s")) is not None]
    if not rows:
        return None

    def col(name: str) -> FloatArray:
        return np.array([v if (v := _num(r.get(name))) is not None else np.nan for r in rows])

    energy = np.nan_to_num(col("energy_total_j"))
    # The counter restarts at 0 with the agent: add each drop back so the curve stays cumulative.
    drops = np.concatenate([[0.0], np.where(np.diff(energy) < 0, energy[:-1], 0.0)])
    sources = [r.get("power_source") or "" for r in rows]
    return Trace(t_s=col("t_s"), cpu_pct=col("cpu_pct"), rss_agent_mb=np.nan_to_num(col("rss_agent_mb")),
                 rss_trainer_mb=np.nan_to_num(col("rss_trainer_mb")), mem_limit_mb=col("mem_limit_mb"),
                 energy_j=energy + np.cumsum(drops), power_source=next((s for s in reversed(sources) if s), ""))


DOWN = Segment("offline", 0.0, 0.0)


def _timeline(events: list[dict[str, Any]], end_s: float) -> dict[str, list[Segment]]:
    current: dict[str, Segment] = {}
    segments: dict[str, list[Segment]] = {}

    def enter(device: str, state: str, t_s: float) -> None:
        cur = current.get(device)
        if cur is not None and cur.state == state:
            return
        if cur is not None:
            cur.end_s = t_s
            if t_s > cur.start_s:
                segments.setdefault(device, []).append(cur)
        current[device] = Segment(state, t_s, t_s)

    for e in events:
        device, kind, t_s = e.get("device"), e["event"], float(e["t"])
        if not isinstance(device, str):
            continue
        if kind == EventName.DEVICE_STATUS and e.get("state") in STATES:
            enter(device, e["state"], t_s)
        elif kind == EventName.DEVICE_OFFLINE or (kind == EventName.AVAILABILITY and not e.get("online")):
            enter(device, "offline", t_s)
        elif kind == EventName.DEVICE_EXIT:  # the campaign runner saw the agent process die
            enter(device, "failed", t_s)
        elif (kind in (EventName.AVAILABILITY, EventName.DEVICE_HELLO)
              and current.get(device, DOWN).state in ("offline", "failed")):
            enter(device, "online", t_s)  # back (or first seen), but has not said what it does yet
    for device in list(current):
        enter(device, "end", max(end_s, current[device].start_s))
    return segments


def load_run(run_dir: Path) -> RunData:
    """Read a run folder; ConfigError (one line) if it is missing or is not a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist")
    for name in ("server.csv", "events.jsonl"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"run folder {run_dir} has no {name}: not an Orchard run, or the server never started")
    warnings: list[str] = []
    events = _read_events(run_dir / "events.jsonl", warnings)
    starts = [float(e["t"]) for e in events if e["event"] == EventName.SERVER_START]
    end_s = float(events[-1]["t"]) if events else 0.0

    fleet: dict[str, Any] | None = None
    if (run_dir / "fleet.json").is_file():
        try:
            fleet = json.loads((run_dir / "fleet.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            warnings.append(f"fleet.json unreadable ({exc}); devices taken from the events")
        if not isinstance(fleet, dict):
            fleet = None
    config_text, config = None, {}
    if (run_dir / "config.toml").is_file():
        config_text = (run_dir / "config.toml").read_text(errors="replace")
        try:
            config = tomllib.loads(config_text)
        except tomllib.TOMLDecodeError as exc:
            warnings.append(f"config.toml is not valid TOML ({exc}); no target accuracy read")
    campaign_table, stop_table, train_table = (t if isinstance(t := config.get(k), dict) else {}
                                               for k in ("campaign", "stop", "train"))
    steps = _num(train_table.get("local_steps"))
    local_steps = int(steps) if steps and not _num(train_table.get("local_epochs")) else None
    fleet_devices = [d for d in (fleet or {}).get("devices", []) if isinstance(d, dict) and "id" in d]
    fleet_by_id = {str(d["id"]): d for d in fleet_devices}

    boards = {str(d["id"]): str(d.get("board", "")) for d in fleet_devices}
    seen: set[str] = set()
    for e in events:
        if isinstance(e.get("device"), str):
            seen.add(e["device"])
            if e["event"] == EventName.DEVICE_HELLO and e.get("board"):
                boards.setdefault(e["device"], str(e["board"]))
    traces = {}
    for path in sorted((run_dir / "devices").glob("*.csv")) if (run_dir / "devices").is_dir() else []:
        trace = _read_trace(path)
        if trace is not None:
            traces[path.stem] = trace
    devices = [str(d["id"]) for d in fleet_devices] or sorted(seen | set(traces), key=_natural)

    # Updates, the rounds they were merged into, and the end of each round, in log order.
    profiles: dict[tuple[str, str], str] = {}
    updates: list[Update] = []
    pending: list[Update] = []
    rounds: dict[int, Round] = {}
    first_dispatch_s: float | None = None
    rejected, stop_reason = 0, None
    ooms: dict[str, list[tuple[float, int]]] = {}
    received: dict[tuple[str, str], dict[str, Any]] = {}
    last_profile: dict[str, str] = {}
    up = down = total_up = total_down = 0
    profile_acc: list[tuple[int, str, float]] = []
    for e in events:
        kind, t_s = e["event"], float(e["t"])
        if kind in (EventName.TASK_FRAME, EventName.ARTIFACT_SENT, EventName.UPDATE_RECEIVED):
            n_bytes = int(_num(e.get("bytes")) or 0)
            if kind == EventName.UPDATE_RECEIVED:
                up, total_up = up + n_bytes, total_up + n_bytes
                received[(str(e.get("device")), str(e.get("task_id")))] = e
            else:
                down, total_down = down + n_bytes, total_down + n_bytes
        elif kind == EventName.TASK_SENT:
            profiles[(str(e.get("device")), str(e.get("task_id")))] = str(e.get("profile"))
            last_profile[str(e.get("device"))] = str(e.get("profile"))
            first_dispatch_s = t_s if first_dispatch_s is None else first_dispatch_s
        elif kind == EventName.UPDATE_ACCEPTED:
            key = (str(e.get("device")), str(e.get("task_id")))
            got = received.get(key, {})
            u = Update(key[0], key[1], t_s, _num(e.get("train_s")) or 0.0, _num(e.get("energy_j")) or 0.0,
                       int(_num(e.get("staleness")) or 0), profiles.get(key),
                       step_ms_median=_num(got.get("step_ms_median")), loss_last=_num(got.get("loss_last")))
            updates.append(u)
            pending.append(u)
        elif (kind == EventName.EVALUATE_PROFILE and _num(e.get("version")) is not None
              and _num(e.get("accuracy")) is not None):
            profile_acc.append((int(e["version"]), str(e.get("profile")), float(e["accuracy"])))
        elif kind.endswith("_rejected"):
            rejected += 1
        elif kind == EventName.AGGREGATION_FAILED:
            pending = []
        elif kind == EventName.AGGREGATED and _num(e.get("version")) is not None:
            r = rounds[int(e["version"])] = Round(int(e["version"]), t_s, n_updates=len(pending), logged=True,
                                                  bytes_up=up, bytes_down=down)
            for u in pending:
                u.version = r.version
                r.train_s += u.train_s
                r.energy_j_updates += u.energy_j
            losses = [u.loss_last for u in pending if u.loss_last is not None]
            r.train_loss = float(np.mean(losses)) if losses else None
            pending, up, down = [], 0, 0
        elif kind == EventName.EVALUATE and _num(e.get("version")) is not None and int(e["version"]) in rounds:
            rounds[int(e["version"])].accuracy = _num(e.get("accuracy"))
            rounds[int(e["version"])].loss = _num(e.get("loss"))
        elif kind == EventName.OOM and isinstance(e.get("device"), str):
            ooms.setdefault(e["device"], []).append((t_s, int(_num(e.get("oom_kills")) or 0)))
        elif kind in (EventName.SERVER_STOP, EventName.CAMPAIGN_STOP, EventName.FINISHED) and e.get("reason"):
            stop_reason = str(e["reason"])

    # server.csv lists the published versions with their accuracy. A version's time is that of
    # its aggregated event (the same clock as t_s); rows without one use t_s, which restarts on a
    # resume of a server that has no campaign clock, so later segments go to their server_start.
    offset_s, last_s, restarts = 0.0, -math.inf, 0
    for row in _read_csv(run_dir / "server.csv"):
        version, row_t_s = _num(row.get("version")), _num(row.get("t_s"))
        if version is None or row_t_s is None:
            continue
        if row_t_s + offset_s < last_s:
            restarts += 1
            offset_s = starts[restarts] if restarts < len(starts) else last_s
        last_s = row_t_s + offset_s
        r = rounds.setdefault(int(version), Round(int(version), last_s))
        if not r.logged:  # the aggregated event is the better clock: it survives resumes and kills
            r.t_s, r.n_updates = last_s, int(_num(row.get("n_updates")) or 0)
        r.accuracy = _num(row.get("accuracy")) if _num(row.get("accuracy")) is not None else r.accuracy
        r.loss = _num(row.get("loss")) if _num(row.get("loss")) is not None else r.loss
    for version, profile, accuracy in profile_acc:
        if version in rounds:
            rounds[version].profile_accuracy[profile] = accuracy
    ordered = sorted(rounds.values(), key=lambda r: r.version)
    n_fleet = max(1, len(devices))
    prev: Round | None = None
    for r in ordered:
        r.start_s, prev = (first_dispatch_s if prev is None else prev.t_s), r
        if r.logged and r.start_s is not None and r.t_s > r.start_s:
            r.utilization = r.train_s / (n_fleet * (r.t_s - r.start_s))
            curves = [tr for tr in traces.values() if tr.t_s.size > 1]  # one sample gives no rate
            if curves:
                r.energy_j_telemetry = sum(float(np.interp(r.t_s, tr.t_s, tr.energy_j) -
                                                 np.interp(r.start_s, tr.t_s, tr.energy_j)) for tr in curves)
    if not any(e["event"] in (EventName.SERVER_STOP, EventName.CAMPAIGN_STOP) for e in events):
        warnings.append("no server_stop event: the run was cut short; this reports what ran")
    return RunData(
        run_dir=run_dir, campaign=str((fleet or {}).get("campaign") or campaign_table.get("name") or run_dir.name),
        strategy=(fleet or {}).get("strategy") or next((e.get("strategy") for e in events
                                                        if e["event"] == EventName.SERVER_START), None),
        fleet=fleet, config_text=config_text, target_accuracy=_num(stop_table.get("target_accuracy")),
        devices=devices, boards=boards, end_s=end_s, rounds=ordered, updates=updates, rejected=rejected,
        timeline=_timeline(events, end_s), ooms=ooms, traces=traces, stop_reason=stop_reason,
        warnings=warnings, bytes_up=total_up, bytes_down=total_down, last_profile=last_profile, local_steps=local_steps,
        groups={d: str(fleet_by_id.get(d, {}).get("group") or boards.get(d) or d) for d in devices},
        work=work_summary(events, "t"), never_joined=never_joined_devices(run_dir, devices, events),
        nodes_lost=[{"node": e.get("node"), "t_s": _num(e.get("t")), "devices": e.get("devices")}
                    for e in events if e["event"] == EventName.NODE_LOST])


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _link_columns(link: Any) -> dict[str, Any]:
    """A shaped device's caps (board Mbit/s) and the bytes its veth carried (fleet.json `link`)."""
    if not isinstance(link, dict):
        return {}
    return {f"link_{k}": link.get(k) for k in ("kind", "up_mbit", "down_mbit", "bytes_up", "bytes_down")}


def summarise(data: RunData) -> dict[str, Any]:
    """The headline figures of a run (see the module docstring for the definitions)."""
    from testbed import breakdown

    rounds, n_fleet = data.rounds, max(1, len(data.devices))
    curve = breakdown.served_curve(data)  # (t_s, version, accuracy) of the model the run serves
    target = data.target_accuracy
    reached = [t for t, _, a in curve if target is not None and a >= target]
    merged = [r for r in rounds if r.logged and r.start_s is not None]
    span_s = (merged[-1].t_s - merged[0].start_s) if merged and merged[0].start_s is not None else 0.0
    fleet_by_id = {str(d.get("id")): d for d in (data.fleet or {}).get("devices", []) if isinstance(d, dict)}
    devices = []
    for device in data.devices:
        mine = [u for u in data.updates if u.device == device]
        spent = {s: 0.0 for s in STATES}
        for seg in data.timeline.get(device, []):
            spent[seg.state] += seg.end_s - seg.start_s
        trace = data.traces.get(device)
        ooms = data.ooms.get(device, [])
        devices.append({
            "id": device, "board": data.boards.get(device, ""),
            **{k: fleet_by_id.get(device, {}).get(k) for k in ("group", "profile", "cpu_quota_cores", "mem_limit_mb")},
            **({"node": fleet_by_id[device]["node"]} if "node" in fleet_by_id.get(device, {}) else {}),
            "profiles": sorted({u.profile for u in mine if u.profile}),
            "updates": len(mine), "train_s": _r(sum(u.train_s for u in mine)),
            "timeline_training_s": _r(spent["training"]), "idle_s": _r(spent["idle"] + spent["online"]),
            "offline_s": _r(spent["offline"]),
            "peak_rss_mb": _r(float(np.max(trace.rss_agent_mb + trace.rss_trainer_mb)), 1) if trace else None,
            "energy_j": _r(float(trace.energy_j[-1])) if trace else None,
            "energy_source": trace.power_source if trace else None,
            "oom_count": max([len(ooms), *(k for _, k in ooms)]),  # oom_kills is the cgroup's cumulative counter
            **_link_columns(fleet_by_id.get(device, {}).get("link")),
        })
    fleet = data.fleet or {}
    fidelity = check_fidelity(data.run_dir, fleet)
    for d in devices:
        d["cpu_delivered"] = fidelity["delivered_cpu"].get(d["id"], {}).get("ratio")
    energies = [float(tr.energy_j[-1]) for d, tr in data.traces.items() if d in data.devices]
    time_to_target_s = reached[0] if reached else None
    return {
        "run": str(data.run_dir), "campaign": data.campaign, "strategy": data.strategy,
        "duration_board_s": _r(data.end_s), "rounds": len(rounds), "n_devices": len(data.devices),
        "served_profile": breakdown.served_profile(data),
        "final_accuracy": curve[-1][2] if curve else None,
        "best_accuracy": max(a for _, _, a in curve) if curve else None,
        "target_accuracy": target, "time_to_target_s": _r(time_to_target_s),
        "energy_to_target_j": _r(breakdown.energy_until_j(data, time_to_target_s)),
        "updates_accepted": len(data.updates), "updates_rejected": data.rejected,
        "utilization": _r(sum(r.train_s for r in merged) / (n_fleet * span_s), 4) if span_s > 0 else None,
        "train_s_total": _r(sum(u.train_s for u in data.updates)),
        "energy_j_total": _r(sum(energies)) if energies else None,
        "bytes_up_total": data.bytes_up, "bytes_down_total": data.bytes_down,
        "throttle_backend": (data.fleet or {}).get("throttle_backend"),
        "throttle_warning": (data.fleet or {}).get("throttle_warning"),
        "time_dilation": fleet.get("time_dilation"), "host_speed_factor": fleet.get("host_speed_factor"),
        "host_speed_source": fleet.get("host_speed_source"), "dilation": fleet.get("dilation"),
        "dilation_warning": fleet.get("dilation_warning"), "fidelity": fidelity,
        "stop_reason": data.stop_reason, "warnings": data.warnings,
        "accuracy_per_profile": breakdown.final_profile_accuracy(data),
        "groups": breakdown.group_rows(data, devices), "devices": devices,
        "wasted_work": wasted_work_figures(data), "never_joined": data.never_joined,
        **({"nodes": fleet["nodes"], "nodes_lost": data.nodes_lost} if "nodes" in fleet else {}),
        "per_round": [{"version": r.version, "t_s": _r(r.t_s), "start_s": _r(r.start_s), "accuracy": r.accuracy,
                       "loss": r.loss, "train_loss": _r(r.train_loss, 4), "n_updates": r.n_updates,
                       "train_s": _r(r.train_s), "utilization": _r(r.utilization, 4),
                       "energy_j_updates": _r(r.energy_j_updates), "energy_j_telemetry": _r(r.energy_j_telemetry),
                       "bytes_up": r.bytes_up, "bytes_down": r.bytes_down,
                       **{f"accuracy[{p}]": a for p, a in sorted(r.profile_accuracy.items())}}
                      for r in rounds],
        "definitions": DEFINITIONS,
    }


LEGACY_DURATION_KEY = "wall_s"  # duration_board_s's name in run folders from before it said board seconds


def duration_board_s(summary: dict[str, Any]) -> float:
    """A summary's run duration in board seconds, from an old run folder's summary.json too."""
    value = summary.get("duration_board_s", summary.get(LEGACY_DURATION_KEY))
    return float(value) if isinstance(value, (int, float)) else 0.0


# The docstring's definitions, one string each, for summary.json and report.html (one source).
DEFINITIONS = [" ".join(item.split()) for item in (__doc__ or "").split("Definitions")[-1].split("\n- ")[1:]]


def render_html(summary: dict[str, Any], data: RunData, pngs: list[Path]) -> str:
    from testbed.compare import format_cell, html_page, html_table, png_figure

    title = f"{summary['campaign']} — {summary['strategy'] or 'unknown strategy'}"
    parts = [f"<h1>Orchard report: {html.escape(title)}</h1>"]
    if summary.get("throttle_warning"):
        parts.append(f"<p class='warn'>⚠ THROTTLING: {html.escape(str(summary['throttle_warning']))}</p>")
    if summary.get("throttle_backend") == "none":
        parts.append("<p class='warn'>⚠ No throttle backend: devices ran at host speed and memory; "
                     "times, memory and energy do not represent the boards.</p>")
    if isinstance(summary.get("dilation"), dict) and summary["dilation"].get("text"):
        parts.append(f"<p class='note'>{html.escape(str(summary['dilation']['text']))}</p>")
    if summary.get("dilation_warning"):
        parts.append(f"<p class='warn'>⚠ {html.escape(str(summary['dilation_warning']))}</p>")
    parts += [f"<p class='warn'>⚠ CPU NOT DELIVERED: {html.escape(w)}</p>" for w in summary["fidelity"]["warnings"]]
    parts += [f"<p class='note'>{html.escape(w)}</p>" for w in summary["warnings"]]
    parts += [f"<p class='warn'>⚠ CLUSTER NODE LOST at {n['t_s']} board s: {html.escape(str(n['node']))}; its "
              f"devices {html.escape(' '.join(n['devices'] or []))} went offline</p>"
              for n in summary.get("nodes_lost", [])]
    headline = [{"figure": k, "value": format_cell(v)} for k, v in summary.items() if not isinstance(v, (list, dict))]
    parts.append("<h2>Summary</h2>" + html_table(headline, ["figure", "value"]))
    columns = ["id", "board", "group", *(["node"] if "nodes" in summary else []), "cpu_quota_cores", "mem_limit_mb",
               "profiles", "updates", "train_s",
               "timeline_training_s", "idle_s", "offline_s", "peak_rss_mb", "energy_j", "energy_source", "oom_count",
               "cpu_delivered"]
    columns += [k for k in ("link_kind", "link_up_mbit", "link_down_mbit", "link_bytes_up", "link_bytes_down")
                if any(k in d for d in summary["devices"])]
    if summary["groups"]:
        parts.append("<h2>Tiers ([[fleet]] groups)</h2>" + html_table(summary["groups"], list(summary["groups"][0])))
    per_profile = [{"profile": p, "final accuracy": a} for p, a in summary["accuracy_per_profile"].items()]
    parts.append("<h2>Accuracy per profile</h2>" + html_table(per_profile, ["profile", "final accuracy"]))
    parts.append("<h2>Devices</h2>" + html_table(summary["devices"], columns))
    parts.append(render_wasted_work(summary))
    parts.append("<h2>Plots</h2>" + "".join(png_figure(p) for p in pngs))
    if summary["per_round"]:
        round_columns = list(dict.fromkeys(k for row in summary["per_round"] for k in row))
        parts.append("<h2>Rounds</h2>" + html_table(summary["per_round"], round_columns))
    parts.append("<h2>Definitions</h2><ul>" + "".join(f"<li>{html.escape(d)}</li>" for d in DEFINITIONS) + "</ul>")
    if data.fleet is not None:
        parts.append(f"<h2>fleet.json</h2><pre>{html.escape(json.dumps(data.fleet, indent=1))}</pre>")
    if data.config_text is not None:
        parts.append(f"<h2>config.toml</h2><pre>{html.escape(data.config_text)}</pre>")
    return html_page(title, "".join(parts))


def write_report(run_dir: Path) -> dict[str, Any]:
    """Write plots/*.png, summary.json and report.html (PNGs embedded as data URIs, so the file
    travels alone) into `run_dir`; returns the summary. Keys of an existing summary.json that the
    report does not compute (e.g. the federation's server_exit) are kept, in the file and in the
    returned dict."""
    from testbed import plots  # matplotlib loads only when plots are drawn

    data = load_run(Path(run_dir))
    summary = summarise(data)
    pngs = plots.write_plots(data, data.run_dir / "plots", summary["warnings"], summary["utilization"])
    old_path = data.run_dir / "summary.json"
    try:
        old = json.loads(old_path.read_text()) if old_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = {}
    old = {k: v for k, v in old.items() if k != LEGACY_DURATION_KEY} if isinstance(old, dict) else {}
    merged = {**old, **summary}
    old_path.write_text(json.dumps(merged, indent=1) + "\n")
    (data.run_dir / "report.html").write_text(render_html(summary, data, pngs))
    return merged


# ---------------------------------------------------------------- wasted work, devices that never joined
def wasted_work_figures(data: RunData) -> dict[str, Any]:
    """summary.json's `wasted_work`: device-seconds whose update was refused or abandoned
    (definitions in server/waste.py), in total and per device of the fleet."""
    work = data.work
    fraction = work.wasted_fraction
    per_device = {}
    for device in data.devices:
        d = work.devices.get(device)
        per_device[device] = {"wasted_s": _r(d.wasted_s if d else 0.0), "useful_s": _r(d.useful_s if d else 0.0),
                              "unfinished_s": _r(d.unfinished_s if d else 0.0),
                              "tasks_wasted": d.tasks_wasted if d else 0,
                              "wasted_energy_j": _r(d.wasted_energy_j if d else 0.0)}
    return {"wasted_s": _r(work.wasted_s), "useful_s": _r(work.useful_s), "wasted_energy_j": _r(work.wasted_energy_j),
            "wasted_fraction": _r(fraction, 4) if fraction is not None else None, "devices": per_device}


def never_joined_devices(run_dir: Path, devices: list[str], events: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Devices of the fleet that never said hello, each with what is known about why: the
    availability trace that kept it frozen, its agent's exits, and the last line of its log."""
    hello = {e.get("device") for e in events if e["event"] == EventName.DEVICE_HELLO}
    out = []
    for device in devices:
        if device in hello:
            continue
        mine = [e for e in events if e.get("device") == device]
        why = []
        offline_at = [float(e["t"]) for e in mine
                      if e["event"] == EventName.AVAILABILITY and not e.get("online")]
        if offline_at:
            online_at = [float(e["t"]) for e in mine
                         if e["event"] == EventName.AVAILABILITY and e.get("online")]
            span = f"until {online_at[-1]:.1f} s" if online_at else "to the end"
            why.append(f"frozen by its availability trace from {offline_at[0]:.1f} s {span}")
        exits = [e for e in mine if e["event"] == EventName.DEVICE_EXIT]
        if exits:
            why.append(f"its agent exited {len(exits)} time(s), last with code {exits[-1].get('code')}")
        ooms = [e for e in mine if e["event"] == EventName.OOM]
        if ooms:
            why.append(f"{ooms[-1].get('oom_kills')} OOM kill(s) under {ooms[-1].get('mem_limit_mb')} MB")
        if not why:
            end_s = float(events[-1]["t"]) if events else 0.0
            why.append(f"its agent neither exited nor was frozen: still starting when the run stopped at {end_s:.1f} s")
        log_path = run_dir / "logs" / f"{device}.log"
        lines = log_path.read_text(errors="replace").strip().splitlines() if log_path.is_file() else []
        why.append(f"last log line: {lines[-1].strip()!r}" if lines else "its log is empty")
        out.append({"id": device, "reason": "; ".join(why)})
    return out


def render_wasted_work(summary: dict[str, Any]) -> str:
    """The report's wasted-work section (and the devices that never joined)."""
    from testbed.compare import html_table

    work = summary["wasted_work"]
    fraction = work["wasted_fraction"]
    share = "n/a" if fraction is None else f"{100 * fraction:.1f} %"
    parts = [f"<h2>Wasted work</h2><p>{work['wasted_s']} device-seconds of {work['wasted_s'] + work['useful_s']:.3f} "
             f"went into updates that were refused or abandoned ({share}); refused updates reported "
             f"{work['wasted_energy_j']} J.</p>"]
    rows = [{"id": device, **figures} for device, figures in work["devices"].items()]
    parts.append(html_table(rows, ["id", "useful_s", "wasted_s", "unfinished_s", "tasks_wasted", "wasted_energy_j"]))
    if summary["never_joined"]:
        parts.append("<h2>Devices that never joined</h2>" + html_table(summary["never_joined"], ["id", "reason"]))
    return "".join(parts)


def failure_line(summary: dict[str, Any]) -> str | None:
    """One line saying why a run that made no aggregation failed, naming the devices that never
    said hello and why; None when it made at least one. `orchard campaign run` and `orchard
    federate` print it and exit 1."""
    if summary.get("rounds"):
        return None
    line = f"campaign {summary.get('campaign')!r} made 0 aggregations ({summary.get('stop_reason') or 'stopped'})"
    never = summary.get("never_joined") or []
    if never:
        line += f": {len(never)} of {summary.get('n_devices')} devices never said hello: "
        line += ", ".join(d["id"] for d in never) + " (" + "; ".join(f"{d['id']}: {d['reason']}" for d in never) + ")"
    return " ".join(line.split())  # one line, whatever a log line held
