"""Read one run folder into a RunData: what the server and the campaign runner left (events.jsonl,
server.csv, devices/<id>.csv, and fleet.json / config.toml when present). Partial runs (Ctrl-C,
SIGKILL: short or half-written files) are read for what ran; unreadable lines are counted, not
fatal. testbed.report turns a RunData into summary.json and report.html.

Clock: every time is in board seconds since the campaign start, the one base that events.jsonl
(`t`), server.csv (`t_s`) and devices/<id>.csv (`t_s`) share; under time dilation a board second
is `dilation` wall seconds (fleet.json). Events before the start (set-up) get negative times.
"""

from __future__ import annotations

import csv
import json
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
