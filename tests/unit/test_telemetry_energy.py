"""Energy bookkeeping of the device sampler: rows, task marks and offline spells.

The sampler runs on injected clocks and an injected CPU-seconds counter, so every expected joule
is known exactly: with the power model (`P = P_idle + (P_max − P_idle)·u`, u = CPU share of the
board), energy over any span is `P_idle · charged seconds + (P_max − P_idle) · CPU seconds / cores`.
`FreezeWatch` is tested for real, on a child process stopped with SIGSTOP.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import time
from pathlib import Path

import pytest

from runtime.board import load_board
from runtime.errors import ConfigError
from runtime.telemetry import CgroupLimits, FreezeWatch, Sampler

BOARD = load_board("rpi4b-4gb")  # power model 1.6-7.2 W, 4 cores, no sensor on this host
P_IDLE, P_SPAN, CORES = BOARD.power.p_idle_w, BOARD.power.p_max_w - BOARD.power.p_idle_w, float(BOARD.cores)


class Rig:
    """Time, CPU use and frozen seconds, advanced by the test."""

    def __init__(self) -> None:
        self.t = 0.0
        self.cpu_s = 0.0
        self.frozen_s = 0.0

    def run(self, seconds: float, busy_cores: float = 0.0, frozen: bool = False) -> None:
        self.t += seconds
        if frozen:
            self.frozen_s += seconds  # a frozen cgroup uses no CPU
        else:
            self.cpu_s += busy_cores * seconds


def make_sampler(tmp_path: Path, rig: Rig, offline: str) -> Sampler:
    limits = CgroupLimits(tmp_path / "no-cgroup", proc_cgroup=str(tmp_path / "no-proc-cgroup"))
    return Sampler(lambda: None, BOARD, tmp_path, limits, clock=lambda: rig.t, offline=offline,
                   freeze=rig, cpu_time_s=lambda: rig.cpu_s, monotonic=lambda: rig.t, start_s=0.0)  # type: ignore[arg-type]


def csv_integral(rows: list[tuple[float, float | None, float]]) -> float:
    """What a reader of devices/<id>.csv gets: the first row's energy, then Σ power_w · Δt."""
    total = rows[0][2]
    for (t0, _, _), (t1, p, _) in itertools.pairwise(rows):
        assert p is not None
        total += p * (t1 - t0)
    return total


@pytest.mark.parametrize("offline", ["unreachable", "powered-off"])
def test_task_energy_rows_and_offline_spells_add_up(tmp_path: Path, offline: str) -> None:
    rig = Rig()
    sampler = make_sampler(tmp_path, rig, offline)
    rows, tasks = [], []

    def row() -> None:
        s = sampler.sample("idle")
        rows.append((s.t, s.power_w, s.energy_j))

    def task(before_s: float, train_s: float, busy: float) -> None:
        rig.run(before_s, 0.01)
        start = sampler.mark()
        rig.run(train_s, busy)
        tasks.append(sampler.mark() - start)

    rig.run(0.7, 0.02)  # start-up, before the first row
    row()
    task(0.2, 0.35, 1.0)  # a sub-second task between two rows
    rig.run(0.45, 0.01)
    row()
    task(0.3, 2.4, 0.8)  # a task across rows: marks must not cut the rows short
    row()
    rig.run(0.6, 0.02)
    rig.run(6.0, frozen=True)  # offline in the middle
    rig.run(0.4, 0.02)
    row()
    task(0.1, 1.2, 1.0)
    rig.run(0.3, 0.01)
    row()
    rig.run(0.2, 0.01)
    rig.run(4.0, frozen=True)  # offline at the end: the shutdown row still covers it
    row()

    charged_s = rig.t - (rig.frozen_s if offline == "powered-off" else 0.0)
    exact = P_IDLE * charged_s + P_SPAN * rig.cpu_s / CORES
    total = sampler.meter.energy_j
    assert total == pytest.approx(exact, rel=1e-9)
    assert csv_integral(rows) == pytest.approx(total, rel=1e-5)  # rows are rounded to 6 decimals
    # Each task's energy is the integral over exactly its interval.
    for energy_j, (train_s, busy) in zip(tasks, [(0.35, 1.0), (2.4, 0.8), (1.2, 1.0)], strict=True):
        assert energy_j == pytest.approx(P_IDLE * train_s + P_SPAN * busy * train_s / CORES, rel=1e-9)
    # Tasks + the time outside them = the device total (nothing counted twice, nothing lost).
    outside_s = rig.t - 0.35 - 2.4 - 1.2
    outside_cpu = rig.cpu_s - 0.35 - 2.4 * 0.8 - 1.2
    frozen = rig.frozen_s if offline == "powered-off" else 0.0
    assert sum(tasks) + P_IDLE * (outside_s - frozen) + P_SPAN * outside_cpu / CORES == pytest.approx(total)


def test_offline_modes_differ_by_idle_power_over_the_frozen_seconds(tmp_path: Path) -> None:
    totals = {}
    for offline in ("unreachable", "powered-off"):
        rig = Rig()
        sampler = make_sampler(tmp_path, rig, offline)
        rig.run(1.0, 0.5)
        rig.run(10.0, frozen=True)
        rig.run(1.0, 0.5)
        sampler.sample("idle")
        totals[offline] = sampler.meter.energy_j
    assert totals["unreachable"] - totals["powered-off"] == pytest.approx(P_IDLE * 10.0)


def test_unknown_offline_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="offline='asleep' is not one of unreachable, powered-off"):
        make_sampler(tmp_path, Rig(), "asleep")


def _watch_child(conn: mpc.Connection) -> None:
    watch = FreezeWatch.for_poll(0.025)  # the agent's way: wakes every 0.1 s, tolerance 0.5 s
    conn.send("ready")
    conn.recv()
    conn.send(watch.frozen_s)


def test_freeze_watch_counts_the_seconds_a_process_was_stopped() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_watch_child, args=(child,), daemon=True)
    proc.start()
    try:
        assert parent.poll(30) and parent.recv() == "ready"
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGSTOP)  # what a frozen cgroup does to every thread
        time.sleep(2.0)
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.3)
        parent.send("report")
        assert parent.poll(10)
        frozen_s = parent.recv()
    finally:
        proc.kill()
        proc.join(5)
    assert 1.5 <= frozen_s <= 2.3


def test_freeze_watch_follows_the_agent_poll_so_dilation_scales_it() -> None:
    plain, dilated = FreezeWatch.for_poll(0.05), FreezeWatch.for_poll(0.05 * 12)
    try:
        assert (plain.period_s, plain.tolerance_s) == pytest.approx((0.2, 1.0))  # the undilated defaults
        # 12x dilation: 12x fewer wakes, and a tolerance (12 s) above the longest CFS period (1 s).
        assert (dilated.period_s, dilated.tolerance_s) == pytest.approx((2.4, 12.0))
    finally:
        plain.close()
        dilated.close()
