"""The live view of a running campaign: one screen, redrawn about once a second.

It reads only what the run folder already holds (events.jsonl and devices/<id>.csv, tailed
from remembered offsets), so it shows what the report will show and costs the harness little.
On a terminal it redraws in place, fitted to the terminal's width (columns are dropped from
the least useful end before anything is cut), greys out offline and failed devices, and draws
a last frame when the campaign ends; otherwise (CI logs) it prints one line per new version.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from server.events import EventName
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


GREY, RESET = "\x1b[90m", "\x1b[0m"
DIMMED_STATES = ("offline", "failed")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
DEFAULT_WIDTH = 100  # when the output is not a terminal that can say its size


def terminal_width(out: TextIO) -> int:
    try:
        return os.get_terminal_size(out.fileno()).columns
    except (AttributeError, OSError, ValueError):  # StringIO, a pipe, a closed stream
        return DEFAULT_WIDTH


# (header, width, format of the device's value), most useful first: the last ones go first when
# the terminal is narrow. The device id column is sized to the ids.
Column = tuple[str, int, Callable[["_DeviceView"], str]]
COLUMNS: tuple[Column, ...] = (
    ("state", 10, lambda v: v.state),
    ("profile", 16, lambda v: v.profile),
    ("cpu %", 7, lambda v: _fmt(v.cpu_pct, ".0f")),
    ("mem MB", 8, lambda v: _fmt(v.rss_mb, ".0f")),
    ("energy J", 10, lambda v: _fmt(v.energy_j, ".1f")),
    ("base v", 7, lambda v: _fmt(v.version, "d")),
    (EventName.OOM, 5, lambda v: str(v.ooms)),
)


class LiveView:
    def __init__(self, run: Path, campaign: Campaign, device_ids: list[str], lines_only: bool = False,
                 out: TextIO | None = None, width: int | None = None) -> None:
        self.run = run
        self.c = campaign
        self.ids = device_ids
        self.out = out or sys.stdout
        self.enabled = True
        self.tty = not lines_only and self.out.isatty()
        self.width = width  # None: ask the terminal at every frame (it may be resized)
        self._now_s = 0.0
        self.view = {d: _DeviceView() for d in device_ids}
        self.events = _Tail(run / "events.jsonl")
        self.telemetry = {d: _Tail(run / "devices" / f"{d}.csv") for d in device_ids}
        self.version = 0
        self.accuracy: float | None = None
        self.evaluated: dict[int, float | None] = {}  # version -> its own accuracy, as evaluated
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
            if kind == EventName.DEVICE_STATUS and v is not None:
                v.state = e.get("state", v.state)
            elif kind == EventName.TASK_SENT and v is not None:
                v.profile, v.version = e.get("profile", v.profile), e.get("base_version")
            elif kind == EventName.AVAILABILITY and v is not None:
                v.state = "online" if e.get("online") else "offline"
            elif kind == EventName.DEVICE_OFFLINE and v is not None:
                v.state = "offline"
            elif kind == EventName.DEVICE_EXIT and v is not None:
                v.state = "failed"
            elif kind == EventName.OOM and v is not None:
                v.ooms = int(e.get("oom_kills", v.ooms))
            elif kind == EventName.AGGREGATED:
                self.version = int(e.get("version", self.version))
            elif kind == EventName.EVALUATE:
                self.accuracy = e.get("accuracy")
                if isinstance(e.get("version"), int):
                    self.evaluated[e["version"]] = self.accuracy
            elif kind == EventName.UPDATE_ACCEPTED:
                self.accepted += 1
            elif kind.endswith("_rejected"):
                self.rejected += 1
        for dev, tail in self.telemetry.items():
            rows = tail.lines()
            if not rows:
                continue
            cols = rows[-1].split(",")
            if len(cols) >= 9 and cols[0] != "t_s":
                v = self.view[dev]
                v.cpu_pct = _num(cols[2])
                rss = (_num(cols[3]) or 0.0) + (_num(cols[4]) or 0.0)
                v.rss_mb = rss
                v.energy_j = _num(cols[8])

    def _progress(self, now_s: float) -> tuple[float, str]:
        parts = [min(1.0, now_s / self.c.duration_board_s)]
        label = f"{now_s:5.0f}/{self.c.duration_board_s:.0f} board s"
        if self.c.rounds:
            parts.append(self.version / self.c.rounds)
            label += f"  version {self.version}/{self.c.rounds}"
        if self.c.target_accuracy and self.accuracy is not None:
            parts.append(self.accuracy / self.c.target_accuracy)
        return min(1.0, max(parts)), label

    def render(self, now_s: float, force: bool = False) -> None:
        """Redraw (at most once a second on a terminal, unless `force`)."""
        if not self.enabled:
            return
        self._now_s = now_s
        self._ingest()
        if not self.tty:
            # One line per evaluated version, with that version's own accuracy (an evaluation
            # lands after its aggregation, so the latest accuracy may belong to an older version).
            for version in sorted(v for v in self.evaluated if v > self._printed_version):
                self._printed_version = version
                own = self.evaluated[version]
                acc = "-" if own is None else f"{own:.4f}"
                self.out.write(f"[{now_s:6.1f} board s] version {version} accuracy {acc} "
                               f"accepted {self.accepted} rejected {self.rejected}\n")
            self.out.flush()
            return
        if not force and time.monotonic() - self._last_draw < 1.0:
            return
        self._last_draw = time.monotonic()
        self.out.write("\x1b[H\x1b[2J" + "\n".join(self.frame(now_s)) + "\n")
        self.out.flush()

    def frame(self, now_s: float) -> list[str]:
        """The screen's lines, each at most the terminal's width (not counting colour codes)."""
        width = max(20, self.width or terminal_width(self.out))
        frac, label = self._progress(now_s)
        bar_n = max(5, min(30, width - len(label) - 3))
        bar = "#" * int(bar_n * frac) + "." * (bar_n - int(bar_n * frac))
        acc = "-" if self.accuracy is None else f"{self.accuracy:.4f}"
        id_width = max(len("device"), *(len(d) for d in self.ids)) + 1 if self.ids else 7
        columns = list(COLUMNS)
        while columns and id_width + sum(w + 1 for _, w, _ in columns) > width:
            columns.pop()
        header = f"{'device':<{id_width}}" + "".join(f"{h:>{w}} " if h != "state" and h != "profile"
                                                     else f"{h:<{w}} " for h, w, _ in columns)
        lines = [_cut(f"orchard campaign {self.c.name}  strategy {self.c.strategy}  accuracy {acc}  "
                      f"updates {self.accepted} accepted / {self.rejected} rejected", width),
                 _cut(f"[{bar}] {label}", width), "", _cut(header.rstrip(), width)]
        for d in self.ids:
            v = self.view[d]
            cells = "".join(f"{_cut(fmt(v), w):<{w}} " if h in ("state", "profile") else f"{_cut(fmt(v), w):>{w}} "
                            for h, w, fmt in columns)
            row = _cut(f"{d:<{id_width}}{cells}".rstrip(), width)
            lines.append(f"{GREY}{row}{RESET}" if v.state in DIMMED_STATES else row)
        return lines

    def close(self) -> None:
        """Draw the last frame (the final state, whatever the redraw throttle says)."""
        if not self.enabled:
            return
        self.render(self._now_s, force=True)
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def visible(line: str) -> str:
    """A frame line without its colour codes (what the terminal shows)."""
    return ANSI.sub("", line)


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _fmt(v: float | int | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)
