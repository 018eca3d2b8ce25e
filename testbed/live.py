"""The live view of a running campaign: one screen, redrawn about once a second.

It reads only what the run folder already holds (events.jsonl and devices/<id>.csv, tailed
from remembered offsets), so it shows what the report will show and costs the harness little.
On a terminal it redraws in place; otherwise (CI logs) it prints one line per new version.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from testbed.campaign import Campaign


@dataclass
class _DeviceView:
    state: str = "starting"
    profile: str = "-"
    version: int | None = None
    cpu_pct: float | None = None
    rss_mb: float | None = None
    energy_j: float | None = None
    ooms: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class _Tail:
    """New complete lines of a growing file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        return [line.decode(errors="replace") for line in complete if line]


class LiveView:
    def __init__(self, run: Path, campaign: Campaign, device_ids: list[str], lines_only: bool = False,
                 out: TextIO | None = None) -> None:
        self.run = run
        self.c = campaign
        self.ids = device_ids
        self.out = out or sys.stdout
        self.enabled = True
        self.tty = not lines_only and self.out.isatty()
        self.view = {d: _DeviceView() for d in device_ids}
        self.events = _Tail(run / "events.jsonl")
        self.telemetry = {d: _Tail(run / "devices" / f"{d}.csv") for d in device_ids}
        self.version = 0
        self.accuracy: float | None = None
        self.accepted = self.rejected = 0
        self._last_draw = 0.0
        self._printed_version = -1

    def _ingest(self) -> None:
        for line in self.events.lines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind, dev = e.get("event", ""), e.get("device")
            v = self.view.get(dev) if isinstance(dev, str) else None
            if kind == "device_status" and v is not None:
                v.state = e.get("state", v.state)
            elif kind == "task_sent" and v is not None:
                v.profile, v.version = e.get("profile", v.profile), e.get("base_version")
            elif kind == "availability" and v is not None and not e.get("online"):
                v.state = "offline"
            elif kind == "oom" and v is not None:
                v.ooms = int(e.get("oom_kills", v.ooms))
            elif kind == "aggregated":
                self.version = int(e.get("version", self.version))
            elif kind == "evaluate":
                self.accuracy = e.get("accuracy")
            elif kind == "update_accepted":
                self.accepted += 1
            elif kind.endswith("_rejected"):
                self.rejected += 1
        for dev, tail in self.telemetry.items():
            rows = tail.lines()
            if not rows:
                continue
            cols = rows[-1].split(",")
            if len(cols) >= 9 and cols[0] != "t":
                v = self.view[dev]
                v.cpu_pct = _num(cols[2])
                rss = (_num(cols[3]) or 0.0) + (_num(cols[4]) or 0.0)
                v.rss_mb = rss
                v.energy_j = _num(cols[8])

    def _progress(self, now_s: float) -> tuple[float, str]:
        parts = [min(1.0, now_s / self.c.wall_s)]
        label = f"{now_s:5.0f}/{self.c.wall_s:.0f} s"
        if self.c.rounds:
            parts.append(self.version / self.c.rounds)
            label += f"  version {self.version}/{self.c.rounds}"
        if self.c.target_accuracy and self.accuracy is not None:
            parts.append(self.accuracy / self.c.target_accuracy)
        return min(1.0, max(parts)), label

    def render(self, now_s: float) -> None:
        if not self.enabled:
            return
        self._ingest()
        if not self.tty:
            if self.version != self._printed_version:
                self._printed_version = self.version
                acc = "-" if self.accuracy is None else f"{self.accuracy:.4f}"
                self.out.write(f"[{now_s:6.1f}s] version {self.version} accuracy {acc} "
                               f"accepted {self.accepted} rejected {self.rejected}\n")
                self.out.flush()
            return
        if time.monotonic() - self._last_draw < 1.0:
            return
        self._last_draw = time.monotonic()
        frac, label = self._progress(now_s)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        acc = "-" if self.accuracy is None else f"{self.accuracy:.4f}"
        lines = [f"orchard campaign {self.c.name}  strategy {self.c.strategy}  accuracy {acc}  "
                 f"updates {self.accepted} accepted / {self.rejected} rejected",
                 f"[{bar}] {label}", "",
                 f"{'device':<14}{'state':<11}{'profile':<16}{'base v':>7}{'cpu %':>8}{'mem MB':>9}"
                 f"{'energy J':>10}{'oom':>5}"]
        for d in self.ids:
            v = self.view[d]
            lines.append(f"{d:<14}{v.state:<11}{v.profile:<16}{_fmt(v.version, 'd'):>7}{_fmt(v.cpu_pct, '.0f'):>8}"
                         f"{_fmt(v.rss_mb, '.0f'):>9}{_fmt(v.energy_j, '.1f'):>10}{v.ooms:>5}")
        self.out.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.out.write("\n")


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _fmt(v: float | int | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)
