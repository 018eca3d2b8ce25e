"""Device telemetry: CPU share of the board, RSS of agent and trainer, cgroup limits, power.

Read from psutil and, when the process sits in a cgroup, from that cgroup's own files (v1 or
v2), so an emulated board reports the limits it is held to, as a real board reports its RAM.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from runtime.board import BoardConfig
from runtime.energy import EnergyMeter, make_power_source
from runtime.errors import TrainerError
from runtime.protocol import TelemetrySample

MB = 1024.0 * 1024.0
_UNLIMITED_V1 = 1 << 60  # cgroup v1 reports "no limit" as a page-rounded LONG_MAX


def _own_cgroup_paths(proc_cgroup: str = "/proc/self/cgroup") -> dict[str, str]:
    """controller -> path of this process's cgroup ("" key for the v2 unified hierarchy)."""
    out: dict[str, str] = {}
    try:
        for line in Path(proc_cgroup).read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    except (OSError, ValueError):
        pass
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def threads_for_quota(cpu_quota_cores: float | None) -> int:
    """Intra-op threads for a CPU quota.

    Rounded down (at least 1): with more threads than whole cores of quota, every parallel
    region waits for a thread the CFS throttler has parked, which is slower than fewer threads.
    """
    if cpu_quota_cores is None:
        return os.cpu_count() or 1
    if not math.isfinite(cpu_quota_cores) or cpu_quota_cores <= 0:
        raise TrainerError(f"CPU quota {cpu_quota_cores} cores is not a positive number")
    return max(1, int(cpu_quota_cores))


class CgroupLimits:
    """Memory limit (MB) and CPU quota (cores) of this process's cgroup, None when unlimited."""

    def __init__(self, root: str | Path = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> None:
        self.root = Path(root)
        self.paths = _own_cgroup_paths(proc_cgroup)

    def _dir(self, controller: str) -> Path | None:
        if controller in self.paths:
            return self.root / controller / self.paths[controller].lstrip("/")
        if "" in self.paths:
            return self.root / self.paths[""].lstrip("/")
        return None

    def mem_limit_mb(self) -> float | None:
        d = self._dir("memory")
        if d is None:
            return None
        for name in ("memory.max", "memory.limit_in_bytes"):
            text = _read(d / name)
            if text is None:
                continue
            if text == "max" or int(text) >= _UNLIMITED_V1:
                return None
            return int(text) / MB
        return None

    def cpu_quota_cores(self) -> float | None:
        d = self._dir("cpu")
        if d is None:
            return None
        text = _read(d / "cpu.max")
        if text is not None:
            quota, _, period = text.partition(" ")
            return None if quota == "max" else int(quota) / int(period or 100000)
        quota_text, period_text = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if quota_text is None or period_text is None or int(quota_text) < 0:
            return None
        return int(quota_text) / int(period_text)


class Sampler:
    """One `TelemetrySample` per call; CPU % is of the board's quota over the last interval.

    The power model, when the board has no sensor, is driven by the CPU share of this device's
    own processes (agent + trainer): on an emulated board they are the whole board's load.
    """

    def __init__(
        self,
        trainer_pid: Callable[[], int | None],
        board: BoardConfig,
        sysfs_root: str | Path = "/",
        limits: CgroupLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.agent = psutil.Process(os.getpid())
        self.trainer_pid = trainer_pid
        self.board_cores = float(board.cores)
        self.limits = limits or CgroupLimits()
        self.clock = clock
        self.utilisation = 0.0  # fraction of the board's CPU quota used in the last interval
        self.meter = EnergyMeter(make_power_source(board, sysfs_root, utilisation=lambda: self.utilisation))
        self._trainer: psutil.Process | None = None
        self._last: tuple[float, float] | None = None  # (monotonic s, cpu s of agent + trainer)

    @property
    def power_source(self) -> str:
        return self.meter.source_name

    def _trainer_proc(self) -> psutil.Process | None:
        pid = self.trainer_pid()
        if pid is None:
            return None
        if self._trainer is None or self._trainer.pid != pid:
            try:
                self._trainer = psutil.Process(pid)
            except psutil.Error:
                return None
        return self._trainer

    @staticmethod
    def _cpu_rss(proc: psutil.Process | None) -> tuple[float, float]:
        if proc is None:
            return 0.0, 0.0
        try:
            with proc.oneshot():
                t = proc.cpu_times()
                return t.user + t.system, proc.memory_info().rss / MB
        except psutil.Error:
            return 0.0, 0.0

    def sample(self, state: str) -> TelemetrySample:
        quota = self.limits.cpu_quota_cores()
        cores = quota if quota is not None else self.board_cores
        agent_cpu, agent_rss = self._cpu_rss(self.agent)
        trainer_cpu, trainer_rss = self._cpu_rss(self._trainer_proc())
        now, cpu_s = time.monotonic(), agent_cpu + trainer_cpu
        cpu_pct = 0.0
        if self._last is not None and now > self._last[0]:
            cpu_pct = max(0.0, 100.0 * (cpu_s - self._last[1]) / (cores * (now - self._last[0])))
        self._last = (now, cpu_s)
        self.utilisation = min(cpu_pct, 100.0) / 100.0
        power = self.meter.sample()
        return TelemetrySample(
            t=self.clock(), state=state, cpu_pct=round(min(cpu_pct, 100.0), 2),
            rss_agent_mb=round(agent_rss, 2), rss_trainer_mb=round(trainer_rss, 2),
            mem_limit_mb=self.limits.mem_limit_mb(), cpu_quota_cores=quota,
            power_w=round(power.power_w, 4) if math.isfinite(power.power_w) else None,
            energy_j=round(power.energy_j, 4),
        )
