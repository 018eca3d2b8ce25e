"""The PNG plots of a run report and of a comparison.

Figures are built with `matplotlib.figure.Figure` and saved through the Agg canvas, never through
pyplot: no GUI backend is touched (headless hosts, CI) and no global figure state leaks between
plots or threads. Every plot draws "no data" instead of failing when a partial run lacks its input.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:  # report imports this module lazily; the types only matter to mypy
    from testbed.run_data import FloatArray, RunData

log = logging.getLogger("orchard.report")

STATE_COLOURS = {"training": "#2b8a3e", "uploading": "#1971c2", "idle": "#dee2e6", "online": "#a5d8ff",
                 "offline": "#343a40", "failed": "#e03131"}
MAX_PANELS = 36  # memory small multiples; beyond this the figure is unreadable anyway
DPI = 100


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this run", ha="center", va="center", transform=ax.transAxes, color="#868e96")


def _dots(t_s: FloatArray) -> dict[str, Any]:
    """Markers on sparse traces, where a line alone would be invisible (one sample is no line)."""
    return {"marker": ".", "ms": 4} if len(t_s) < 60 else {}


def _colour(i: int) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    return colormaps["tab10" if i < 10 else "tab20"](i % 20)


def plot_accuracy(data: RunData, path: Path) -> Path:
    """Global model accuracy vs wall time and vs version, with the target as a dotted line; one
    more line per submodel profile the server scored (dashed)."""
    fig = Figure(layout="constrained", figsize=(11, 3.8))
    ax_t, ax_v = fig.subplots(1, 2)
    rounds = [r for r in data.rounds if r.accuracy is not None]
    profiles = sorted({p for r in data.rounds for p in r.profile_accuracy})
    for ax, by_time, label in ((ax_t, True, "board seconds since campaign start"),
                               (ax_v, False, "global model version")):
        if rounds:
            ax.plot([r.t_s if by_time else r.version for r in rounds], [r.accuracy or 0.0 for r in rounds],
                    marker="o", ms=3, color=_colour(0), label="global model")
            for i, profile in enumerate(profiles, start=1):
                scored = [r for r in data.rounds if profile in r.profile_accuracy]
                ax.plot([r.t_s if by_time else r.version for r in scored],
                        [r.profile_accuracy[profile] for r in scored], ls="--", marker=".", ms=3, color=_colour(i),
                        label=profile)
            if profiles or data.target_accuracy is not None:
                ax.legend(loc="lower right", fontsize="small")
            if data.target_accuracy is not None:
                ax.axhline(data.target_accuracy, ls=":", color="#e03131", label=f"target {data.target_accuracy:g}")
                ax.legend(loc="lower right", fontsize="small")
        else:
            _no_data(ax, "evaluation")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    ax_v.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{data.campaign}: accuracy")
    return _save(fig, path)


def plot_loss(data: RunData, path: Path) -> Path:
    """The loss curve: the global model's held-out loss and the merged updates' mean training loss
    (at the end of their tasks), per version."""
    fig = Figure(layout="constrained", figsize=(5.5, 3.5))
    ax = fig.subplots()
    evaluated = [r for r in data.rounds if r.loss is not None]
    trained = [r for r in data.rounds if r.train_loss is not None]
    if evaluated:
        ax.plot([r.version for r in evaluated], [r.loss or 0.0 for r in evaluated], marker="o", ms=3,
                label="held-out loss")
    if trained:
        ax.plot([r.version for r in trained], [r.train_loss or 0.0 for r in trained], marker=".", ms=3, ls="--",
                label="training loss (merged updates)")
    if evaluated or trained:
        ax.legend(fontsize="small")
    else:
        _no_data(ax, "loss")
    ax.set_xlabel("global model version")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.set_title(f"{data.campaign}: loss")
    return _save(fig, path)


def plot_bytes(data: RunData, path: Path) -> Path:
    """Bytes down (tasks and artifacts) and up (updates) per round, in MB."""
    fig = Figure(layout="constrained", figsize=(5.5, 3.5))
    ax = fig.subplots()
    rounds = [r for r in data.rounds if r.logged]
    if rounds and (data.bytes_up or data.bytes_down):
        versions = np.array([r.version for r in rounds], dtype=float)
        ax.bar(versions - 0.2, [r.bytes_down / 1e6 for r in rounds], width=0.4, color="#1971c2", label="down")
        ax.bar(versions + 0.2, [r.bytes_up / 1e6 for r in rounds], width=0.4, color="#f08c00", label="up")
        ax.legend(fontsize="small")
    else:
        _no_data(ax, "frame size")
    ax.set_xlabel("global model version (round end)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("MB per round")
    ax.set_title(f"{data.campaign}: bytes per round")
    return _save(fig, path)


def plot_timeline(data: RunData, path: Path) -> Path:
    """One bar per device, coloured by state over time; red crosses are OOM kills, faint
    vertical lines are aggregations."""
    devices = data.devices
    fig = Figure(layout="constrained", figsize=(11, 1.2 + 0.35 * max(1, len(devices))))
    ax = fig.subplots()
    for y, device in enumerate(devices):
        for state in STATE_COLOURS:
            spans = [(s.start_s, s.end_s - s.start_s) for s in data.timeline.get(device, []) if s.state == state]
            if spans:
                ax.broken_barh(spans, (y - 0.4, 0.8), facecolors=STATE_COLOURS[state])
        ooms = data.ooms.get(device, [])
        if ooms:
            ax.plot([t for t, _ in ooms], [y] * len(ooms), "x", color="#c92a2a", ms=10, mew=2.5)
    for r in data.rounds:
        ax.axvline(r.t_s, color="#868e96", lw=0.5, alpha=0.4)
    ax.set_yticks(range(len(devices)), devices)
    ax.set_ylim(max(1, len(devices)) - 0.5, -0.5)
    ax.set_xlabel("board seconds since campaign start")
    handles: list[Patch | Line2D] = [Patch(color=c, label=s) for s, c in STATE_COLOURS.items()]
    handles.append(Line2D([], [], marker="x", color="#c92a2a", ls="", mew=2.5, label="OOM kill"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    if not any(data.timeline.values()):
        _no_data(ax, "device status")
    ax.set_title(f"{data.campaign}: device timeline (lines: aggregations)")
    return _save(fig, path)


def plot_cpu(data: RunData, path: Path) -> Path:
    """CPU use of each device, as % of its board's quota (telemetry), one line per device."""
    fig = Figure(layout="constrained", figsize=(11, 3.5))
    ax = fig.subplots()
    for i, (device, tr) in enumerate(data.traces.items()):
        ax.plot(tr.t_s, tr.cpu_pct, label=device, color=_colour(i), lw=1, **_dots(tr.t_s))
    if data.traces:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", ncols=1 + len(data.traces) // 16)
    else:
        _no_data(ax, "telemetry")
    ax.set_ylim(0, 105)
    ax.set_xlabel("board seconds since campaign start")
    ax.set_ylabel("CPU (% of board quota)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{data.campaign}: CPU")
    return _save(fig, path)


def plot_memory(data: RunData, path: Path) -> Path:
    """Small multiples, one per device: agent, trainer and total RSS; dashed: the memory limit."""
    devices = [d for d in data.devices if d in data.traces][:MAX_PANELS] or ["-"]
    cols = min(4, len(devices))
    rows = math.ceil(len(devices) / cols)
    fig = Figure(layout="constrained", figsize=(3.2 * cols, 2.3 * rows + 0.6))
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, squeeze=False)).ravel()
    for ax, device in zip(axes, devices, strict=False):
        tr = data.traces.get(device)
        if tr is None:
            _no_data(ax, "telemetry")
            continue
        dots = _dots(tr.t_s)
        ax.plot(tr.t_s, tr.rss_agent_mb + tr.rss_trainer_mb, color="k", lw=1.2, label="agent+trainer", **dots)
        ax.plot(tr.t_s, tr.rss_agent_mb, color="#1971c2", lw=0.8, label="agent", **dots)
        ax.plot(tr.t_s, tr.rss_trainer_mb, color="#2b8a3e", lw=0.8, label="trainer", **dots)
        total = tr.rss_agent_mb + tr.rss_trainer_mb
        peak = float(np.nanmax(total)) if np.isfinite(total).any() else 0.0
        limit = float(np.nanmax(tr.mem_limit_mb)) if np.isfinite(tr.mem_limit_mb).any() else None
        if limit is not None and limit <= 3 * max(peak, 1.0):
            ax.plot(tr.t_s, tr.mem_limit_mb, color="#e03131", ls="--", lw=1, label="limit")
        elif limit is not None:
            # A multi-GB board cap would flatten a ~100 MB working set: scale to the data, say the cap.
            ax.set_ylim(top=peak * 1.4)
            ax.text(0.98, 0.95, f"limit {limit:.0f} MB (off scale)", transform=ax.transAxes, ha="right",
                    va="top", fontsize="x-small", color="#e03131")
        for t, _ in data.ooms.get(device, []):
            ax.axvline(t, color="#c92a2a", lw=1.5)
        ax.set_title(device, fontsize="small")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes[len(devices):]:
        ax.set_axis_off()
    if data.traces:
        axes[0].legend(fontsize="x-small")
    axes[0].set_ylabel("RSS (MB)")
    extra = len([d for d in data.devices if d in data.traces]) - MAX_PANELS
    fig.suptitle(f"{data.campaign}: memory (red line: OOM kill)" + (f"; {extra} more not shown" if extra > 0 else ""))
    fig.supxlabel("board seconds since campaign start")
    return _save(fig, path)


def plot_energy(data: RunData, path: Path) -> Path:
    """Left: each device's telemetry energy (J). Right: per round, the merged updates' training
    energy (bars) and the whole fleet's telemetry energy in that round (line, idle included)."""
    fig = Figure(layout="constrained", figsize=(11, 3.8))
    ax_d, ax_r = fig.subplots(1, 2)
    devices = [d for d in data.devices if d in data.traces]
    if devices:
        ax_d.bar(range(len(devices)), [float(data.traces[d].energy_j[-1]) for d in devices], color="#f59f00")
        ax_d.set_xticks(range(len(devices)), devices, rotation=90 if len(devices) > 8 else 0, fontsize="small")
    else:
        _no_data(ax_d, "telemetry")
    ax_d.set_ylabel("energy (J)")
    ax_d.set_ylim(bottom=0)
    ax_d.set_title("per device (telemetry, cumulative)")
    if data.rounds:
        versions = [r.version for r in data.rounds]
        ax_r.bar(versions, [r.energy_j_updates for r in data.rounds], color="#2b8a3e", label="merged updates' energy_j")
        tele = [np.nan if r.energy_j_telemetry is None else r.energy_j_telemetry for r in data.rounds]
        if np.isfinite(tele).any():
            ax_r.plot(versions, tele, color="#f59f00", marker="o", ms=3, label="fleet telemetry in round")
        ax_r.legend(fontsize="small")
        ax_r.set_xlabel("global model version (round end)")
        ax_r.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        _no_data(ax_r, "aggregation")
    ax_r.set_ylabel("energy (J)")
    ax_r.set_ylim(bottom=0)
    ax_r.set_title("per round")
    fig.suptitle(f"{data.campaign}: energy")
    return _save(fig, path)


def plot_staleness(data: RunData, path: Path) -> Path:
    """Histogram of the staleness (versions behind) of accepted updates."""
    fig = Figure(layout="constrained", figsize=(5.5, 3.5))
    ax = fig.subplots()
    stale = np.array([u.staleness for u in data.updates], dtype=int)
    if stale.size:
        counts = np.bincount(np.clip(stale, 0, None))
        ax.bar(range(counts.size), counts, color="#7048e8")
        ax.set_xticks(range(counts.size))
    else:
        _no_data(ax, "accepted update")
    ax.set_xlabel("staleness (versions behind)")
    ax.set_ylabel("accepted updates")
    ax.set_title(f"{data.campaign}: staleness")
    return _save(fig, path)


def plot_utilization(data: RunData, path: Path, overall: float | None) -> Path:
    """Per-round Co-S²P utilisation Σ train_s / (N · round length); dashed: the whole run's."""
    fig = Figure(layout="constrained", figsize=(5.5, 3.5))
    ax = fig.subplots()
    rounds = [r for r in data.rounds if r.utilization is not None]
    if rounds:
        ax.bar([r.version for r in rounds], [r.utilization or 0.0 for r in rounds], color="#1098ad")
        if overall is not None:
            ax.axhline(overall, color="k", ls="--", lw=1, label=f"run: {overall:.3f}")
            ax.legend(fontsize="small")
    else:
        _no_data(ax, "aggregation")
    ax.set_xlabel("global model version (round end)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("utilisation U")
    ax.set_title(f"{data.campaign}: resource utilisation")
    return _save(fig, path)


def write_plots(data: RunData, out: Path, warnings: list[str], overall_utilization: float | None) -> list[Path]:
    """Draw every plot into `out`; a plot that fails is named in `warnings` and the others still
    come out, so a strange partial run loses one figure and not the whole report."""
    out.mkdir(parents=True, exist_ok=True)
    overall = overall_utilization
    jobs: list[tuple[str, Callable[[Path], Path]]] = [
        ("accuracy", lambda p: plot_accuracy(data, p)), ("loss", lambda p: plot_loss(data, p)),
        ("bytes", lambda p: plot_bytes(data, p)), ("timeline", lambda p: plot_timeline(data, p)),
        ("cpu", lambda p: plot_cpu(data, p)), ("memory", lambda p: plot_memory(data, p)),
        ("energy", lambda p: plot_energy(data, p)), ("staleness", lambda p: plot_staleness(data, p)),
        ("utilization", lambda p: plot_utilization(data, p, overall)),
    ]
    written = []
    for name, draw in jobs:
        try:
            written.append(draw(out / f"{name}.png"))
        except Exception as exc:  # report the rest; the message says which plot and why
            log.exception("plot %s failed", name)
            warnings.append(f"plot {name} failed: {type(exc).__name__}: {exc}")
    return written


def plot_overlay(series: Sequence[tuple[str, Sequence[float], Sequence[float], Sequence[int]]],
                 path: Path, target: float | None = None) -> Path:
    """Accuracy vs wall time and vs version for several runs; series = (label, t_s, accuracy, versions)."""
    fig = Figure(layout="constrained", figsize=(12, 4.2))
    ax_t, ax_v = fig.subplots(1, 2)
    for i, (label, t_s, acc, versions) in enumerate(series):
        ax_t.plot(t_s, acc, marker="o", ms=2.5, color=_colour(i), label=label)
        ax_v.plot(versions, acc, marker="o", ms=2.5, color=_colour(i), label=label)
    for ax, xlabel in ((ax_t, "board seconds since campaign start"), (ax_v, "global model version")):
        if target is not None:
            ax.axhline(target, ls=":", color="#e03131", label=f"target {target:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    ax_v.xaxis.set_major_locator(MaxNLocator(integer=True))
    if series:
        ax_v.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.suptitle("accuracy, overlaid")
    return _save(fig, path)


def plot_bands(bands: dict[str, dict[str, list[float]]], path: Path, target: float | None = None) -> Path:
    """Accuracy vs time per variant over its seeds: the mean as a line, min–max as a band."""
    fig = Figure(layout="constrained", figsize=(9, 4.2))
    ax = fig.subplots()
    for i, (label, band) in enumerate(bands.items()):
        t = np.asarray(band["t_s"], dtype=float)
        ax.plot(t, np.asarray(band["mean"], dtype=float), color=_colour(i), label=label)
        ax.fill_between(t, np.asarray(band["min"], dtype=float), np.asarray(band["max"], dtype=float),
                        color=_colour(i), alpha=0.2, lw=0)
    if target is not None:
        ax.axhline(target, ls=":", color="#e03131", label=f"target {target:g}")
    if bands:
        ax.legend(loc="lower right", fontsize="small")
    else:
        _no_data(ax, "evaluation")
    ax.set_xlabel("board seconds since campaign start")
    ax.set_ylabel("accuracy (served model)")
    ax.grid(alpha=0.3)
    ax.set_title("accuracy over seeds: mean (line), min–max (band)")
    return _save(fig, path)
