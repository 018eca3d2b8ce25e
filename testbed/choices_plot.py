"""Vector over time against the CPU trace, for a run whose devices log their choices.

A method that picks what to train on the device (DISTREAL) records each change in its update's
report as `choice.<i>.t_s` (seconds into the task), `choice.<i>.vector` and `choice.<i>.reason`;
`steps.<i>` counts the batches per choice. This reads `events.jsonl` (the tasks' start times,
the accepted updates' reports, the runner's `cpu_quota` events), puts each choice at board time
`task_sent.t + t_s / dilation`, and plots per device the CPU fraction (step line) and the chosen
option (markers), into `plots/choices.png`. Dropped tasks never report, so their time is blank.

    python -m testbed.choices_plot runs/compare-distreal/distreal/seed-0
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError

REASON_MARKERS = {0: "s", 1: "o", 2: "x", 3: "d", 4: "^"}


def read_choices(run: Path) -> tuple[dict[str, list[tuple[float, int, int]]], dict[str, list[tuple[float, float]]]]:
    """Per device: (board t, option, reason) and (board t, CPU fraction)."""
    path = run / "events.jsonl"
    try:
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable: {exc}") from None
    try:
        dilation = float(json.loads((run / "fleet.json").read_text()).get("time_dilation", 1.0))
    except (OSError, ValueError):
        dilation = 1.0
    sent = {e["task_id"]: float(e["t"]) for e in events if e.get("event") == "task_sent"}
    choices: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    cpu: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        if e.get("event") == "cpu_quota":
            cpu[e["device"]].append((float(e["t"]), float(e["fraction"])))
        report: dict[str, Any] = e.get("report") or {}
        if e.get("event") != "update_accepted" or e.get("task_id") not in sent:
            continue
        i = 0
        while f"choice.{i}.vector" in report:
            t = sent[e["task_id"]] + float(report[f"choice.{i}.t_s"]) / dilation
            choices[e["device"]].append((t, int(report[f"choice.{i}.vector"]), int(report[f"choice.{i}.reason"])))
            i += 1
    return dict(choices), dict(cpu)


def plot_choices(run: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    choices, cpu = read_choices(run)
    if not choices:
        raise ConfigError(f"{run}: no accepted update reports a choice (choice.<i>.vector)")
    devices = sorted(choices)
    fig = Figure(figsize=(7.0, 1.6 + 1.5 * len(devices)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(devices), 1, sharex=True, squeeze=False)[:, 0]
    top = max(v for rows in choices.values() for _, v, _ in rows)
    for ax, device in zip(axes, devices, strict=True):
        trace = sorted(cpu.get(device, []))
        if trace:
            end = max(t for t, _, _ in choices[device])
            trace.append((max(end, trace[-1][0]), trace[-1][1]))  # hold the last value to the end
            ts, fs = zip(*trace, strict=True)
            ax.step(ts, fs, where="post", c="0.5", label="CPU fraction")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(device, fontsize=8)
        twin = ax.twinx()
        for reason, marker in REASON_MARKERS.items():
            pts = [(t, v) for t, v, r in choices[device] if r == reason]
            if pts:
                twin.scatter(*zip(*pts, strict=True), marker=marker, s=18, c="C3")
        twin.set_ylim(-0.5, top + 0.5)
        twin.set_ylabel("option", fontsize=8)
    axes[-1].set_xlabel("board seconds since campaign start")
    axes[0].set_title("choice per task (markers: o fits, x none fits, ^ unmeasured) over the CPU trace", fontsize=9)
    fig.tight_layout()
    out = run / "plots" / "choices.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    try:
        print(plot_choices(Path(sys.argv[1])))
    except (ConfigError, IndexError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
