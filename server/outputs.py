"""The server's outputs and its clock: board seconds since the campaign start, and the run
folder's events.jsonl, server.csv and devices/<id>.csv, each flushed line by line.

Split out of server/service.py (the MQTT side stays there); no behaviour of its own.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from runtime.protocol import Telemetry, Update
from server.events import EventName

MAX_OPEN_CSV = 64  # telemetry files held open at once (1,016 ids once exhausted the descriptors)
# Times in every output (server.csv t_s, devices/<id>.csv t_s, events.jsonl t) are board seconds
# since the campaign start ([clock] in the config); `_total` columns are cumulative counters.
SERVER_CSV = ("round", "version", "t_s", "accuracy", "loss", "n_updates", "accepted_total", "rejected_total",
              "staleness_mean", "staleness_max", "devices", "reason")
DEVICE_CSV = ("t_s", "state", "cpu_pct", "rss_agent_mb", "rss_trainer_mb", "mem_limit_mb", "cpu_quota_cores",
              "power_w", "energy_total_j", "temp_c", "power_source")

# Update metrics in the device's own wall time, by the name each has in board time: a device
# sends `task_wall_s` (its clock), every output says `task_board_s`, whatever the dilation.
DILATED_METRICS = {"step_ms_median": "step_ms_median", "task_wall_s": "task_board_s"}


@dataclass(frozen=True)
class BoardClock:
    """Board seconds since the campaign start. A device measures in its own wall time; under
    time dilation (the testbed slowed down by `dilation`) a board second takes `dilation` wall
    seconds, so durations and energies (power x wall time) are divided by it on arrival."""

    start_unix: float
    dilation: float = 1.0

    def now(self) -> float:
        return (time.time() - self.start_unix) / self.dilation

    def at(self, unix_s: float) -> float:
        return (unix_s - self.start_unix) / self.dilation

    def update(self, update: Update) -> Update:
        d = self.dilation
        if d == 1.0 and all(DILATED_METRICS.get(k, k) == k for k in update.metrics):
            return update
        metrics = {DILATED_METRICS.get(k, k): (v / d if k in DILATED_METRICS else v) for k, v in update.metrics.items()}
        return dataclasses.replace(update, train_s=update.train_s / d, metrics=metrics,
                                   energy_j=None if update.energy_j is None else update.energy_j / d)


def first_start(run_dir: Path, dilation: float) -> float | None:
    """Where a resumed run without a [clock] started: its first server_start (Unix s), so the
    resumed outputs continue the same time base."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError), (run_dir / "events.jsonl").open() as f:
        for line in f:
            e = json.loads(line)
            if isinstance(e, dict) and e.get("event") == EventName.SERVER_START:
                return float(e["wall_t"]) - float(e["t"]) * dilation
    return None


class Outputs:
    """events.jsonl, server.csv and devices/<id>.csv, flushed line by line so a crash loses nothing."""

    def __init__(self, run_dir: Path, resume: bool, clock: BoardClock) -> None:
        self.run_dir = run_dir
        self.clock = clock
        (run_dir / "devices").mkdir(parents=True, exist_ok=True)
        events = run_dir / "events.jsonl"
        if not resume:
            events.write_text("")
        # O_APPEND: the campaign runner appends its own events (availability, OOM) to this file.
        self.events: TextIO = events.open("a")
        new_csv = not resume or not (run_dir / "server.csv").exists()
        self._server_file: TextIO = (run_dir / "server.csv").open("w" if new_csv else "a", newline="")
        self.server = csv.writer(self._server_file)
        if new_csv:
            self.server.writerow(SERVER_CSV)
        # Open telemetry CSVs, least recently written first: a fleet larger than MAX_OPEN_CSV
        # reopens files (append) instead of running out of descriptors.
        self._devices: OrderedDict[str, tuple[TextIO, Any]] = OrderedDict()
        self.accepted = self.rejected = 0
        if not new_csv:  # resumed: the counts are over the campaign, so go on from the last row
            with (run_dir / "server.csv").open(newline="") as f:
                last = list(csv.DictReader(f))[-1:]
            if last:
                self.accepted = int(last[0].get("accepted_total") or 0)
                self.rejected = int(last[0].get("rejected_total") or 0)

    def event(self, record: dict[str, Any]) -> None:
        record.setdefault("wall_t", round(time.time(), 3))
        record.setdefault("t", round(self.clock.at(record["wall_t"]), 3))
        kind = record.get("event", "")
        if kind == EventName.UPDATE_ACCEPTED:
            self.accepted += 1
        elif kind.endswith("_rejected"):
            self.rejected += 1
        self.events.write(json.dumps(record, default=str) + "\n")
        self.events.flush()

    def server_row(self, row: dict[str, Any]) -> None:
        self.server.writerow([row.get(k, "") for k in SERVER_CSV])
        self._server_file.flush()

    def telemetry(self, t: Telemetry) -> None:
        if t.device_id in self._devices:
            self._devices.move_to_end(t.device_id)
        else:
            while len(self._devices) >= MAX_OPEN_CSV:
                self._devices.popitem(last=False)[1][0].close()
            path = self.run_dir / "devices" / f"{t.device_id}.csv"
            fresh = not path.exists()
            handle: TextIO = path.open("a", newline="")
            writer = csv.writer(handle)
            if fresh:
                writer.writerow(DEVICE_CSV)
            self._devices[t.device_id] = (handle, writer)
        f, w = self._devices[t.device_id]
        d = self.clock.dilation
        for s in t.samples:
            energy_j = None if s.energy_j is None else round(s.energy_j / d, 4)
            w.writerow([round(self.clock.at(s.t), 3), s.state, s.cpu_pct, s.rss_agent_mb, s.rss_trainer_mb,
                        s.mem_limit_mb, s.cpu_quota_cores, s.power_w, energy_j, s.temp_c, t.power_source])
        f.flush()

    def close(self) -> None:
        self.events.close()
        self._server_file.close()
        for f, _ in self._devices.values():
            f.close()
