"""Device telemetry: CPU share of the board, RSS of agent and trainer, cgroup limits, power.

Read from psutil and, when the process sits in a cgroup, from that cgroup's own files (v1 or
v2), so an emulated board reports the limits it is held to, as a real board reports its RAM.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from runtime.board import BoardConfig
from runtime.device_config import OFFLINE_MODES as OFFLINE_MODES  # with the config key it checks
from runtime.energy import EnergyMeter, make_power_source
from runtime.errors import ConfigError, TrainerError
from runtime.jetson_gpu import JetsonGpu
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


def threads_for_quota(cpu_quota_cores: float | None, board_cores: int | None = None) -> int:
    """Intra-op threads for a CPU quota: ceil(quota), at most the board's cores.

    Rounded up: an Orin NX at 1.77 cores on one thread could use only 1 of them, and a board's
    speed is its cores working together. The price is that a parallel region can wait for a
    thread the CFS throttler has parked; that costs less than leaving 0.77 cores unused.
    """
    if cpu_quota_cores is None:
        return board_cores or os.cpu_count() or 1
    if not math.isfinite(cpu_quota_cores) or cpu_quota_cores <= 0:
        raise TrainerError(f"CPU quota {cpu_quota_cores} cores is not a positive number")
    threads = max(1, math.ceil(cpu_quota_cores - 1e-6))  # 2.0000001 cores is 2, not 3
    return min(threads, board_cores) if board_cores else threads


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


class FreezeWatch:
    """Seconds this process was stopped as a whole (a frozen cgroup, SIGSTOP), measured by a
    daemon thread that wakes every `period_s` and counts the excess of each sleep over
    `tolerance_s`. A main loop blocked on I/O or on a trainer start does not hold it back (those
    waits release the GIL), and a CFS throttle delays it by about one period (100 ms), far below
    the tolerance; a frozen cgroup stops every thread, so the gap shows in full."""

    @classmethod
    def for_poll(cls, poll_s: float) -> FreezeWatch:
        """On the agent loop's time scale: 4 and 20 polls (0.2 s / 1 s at the 50 ms default). Under
        time dilation poll_s is 50 ms x delta, so the watch wakes delta times less often (each wake
        costs ~65 us of a quota delta times smaller) and its tolerance stays above the CFS
        period, which grows as the dilated quota shrinks (testbed.cgroups.cpu_period_us, up to
        1 s); a frozen spell lasts its board seconds x delta, so none worth counting is missed."""
        return cls(period_s=4 * poll_s, tolerance_s=20 * poll_s)

    def __init__(self, period_s: float = 0.2, tolerance_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s, self.tolerance_s, self._clock = period_s, tolerance_s, clock
        self.started_s = self._last_tick = clock()
        self._frozen_s = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orchard-freeze-watch", daemon=True)
        self._thread.start()

    @property
    def frozen_s(self) -> float:
        """Frozen seconds so far, including a spell the thread has not counted yet: right after a
        thaw the reader may run before the thread does (it needs the GIL), so a gap since the
        thread's last tick that exceeds the tolerance is counted here too. The thread later adds
        the same gap measured to its own, later tick, so the total only grows."""
        with self._lock:
            pending = self._clock() - self._last_tick - self.period_s
            return self._frozen_s + (pending if pending > self.tolerance_s else 0.0)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            with self._lock:
                now = self._clock()
                excess = now - self._last_tick - self.period_s
                if excess > self.tolerance_s:
                    self._frozen_s += excess
                self._last_tick = now

    def close(self) -> None:
        self._stop.set()


def process_start_monotonic_s() -> float:
    """When this process was created, on the monotonic clock (psutil gives it in epoch seconds)."""
    created = float(psutil.Process(os.getpid()).create_time())
    return time.monotonic() - max(0.0, time.time() - created)


class Sampler:
    """One `TelemetrySample` per `sample()` call (a row of the device's CSV), and `mark()` for
    the energy at any moment (task start and end).

    Energy is integrated over consecutive *intervals*, each from one reading (row or mark) to
    the next. With the power model (no sensor), the interval's power comes from the CPU share of
    this device's own processes (agent + trainer, including trainers that died) over it: on an
    emulated board they are the whole board's load. A row reports the means over the whole span
    since the previous row, marks included: `cpu_pct`, and `power_w = Δenergy_j / Δt`, so
    `Σ power_w · Δt` over the rows equals the `energy_j` column exactly.

    Offline (`offline`, see OFFLINE_MODES): "unreachable" charges every second from the
    creation of the process on (frozen seconds at idle power: no CPU is used while frozen);
    "powered-off" starts at the runtime's own start and leaves the frozen seconds `FreezeWatch`
    counts out of the integral.
    """

    def __init__(
        self,
        trainer_pid: Callable[[], int | None],
        board: BoardConfig,
        sysfs_root: str | Path = "/",
        limits: CgroupLimits | None = None,
        clock: Callable[[], float] = time.time,
        *,
        offline: str = "unreachable",
        freeze: FreezeWatch | None = None,
        cpu_time_s: Callable[[], float] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        start_s: float | None = None,
    ) -> None:
        if offline not in OFFLINE_MODES:
            raise ConfigError(f"offline={offline!r} is not one of {', '.join(OFFLINE_MODES)}")
        self.agent = psutil.Process(os.getpid())
        self.trainer_pid = trainer_pid
        self.board_cores = float(board.cores)
        self.limits = limits or CgroupLimits()
        self.clock = clock
        self.offline = offline
        self.freeze = freeze
        self._monotonic = monotonic
        self._cpu_time_s = cpu_time_s or self._own_cpu_s
        self.utilisation = 0.0  # fraction of the board's CPU quota used in the last interval
        self._trainer: psutil.Process | None = None
        self._trainer_cpu_s = 0.0  # last reading of the current trainer
        self._dead_trainers_cpu_s = 0.0  # what trainers that have since died had used
        from_creation = start_s is None and offline == "unreachable"
        if start_s is None:
            start_s = process_start_monotonic_s() if from_creation else monotonic()
        # Our processes' CPU counters start at 0 when they are created.
        cpu0 = 0.0 if from_creation and cpu_time_s is None else self._cpu_time_s()
        self.meter = EnergyMeter(make_power_source(board, sysfs_root, utilisation=lambda: self.utilisation),
                                 clock=monotonic, start_s=start_s)
        self.gpu = JetsonGpu.detect(sysfs_root, self.meter.source, clock=monotonic)
        frozen0 = freeze.frozen_s if freeze is not None else 0.0
        self._last = (start_s, cpu0, frozen0)  # (monotonic s, cpu s, frozen s) at the last reading
        self._row = (start_s, cpu0, 0.0)  # (monotonic s, cpu s, energy J) at the last row

    @property
    def power_source(self) -> str:
        return self.meter.source_name

    def _cores(self) -> float:
        quota = self.limits.cpu_quota_cores()
        return quota if quota is not None else self.board_cores

    def _trainer_proc(self) -> psutil.Process | None:
        pid = self.trainer_pid()
        if pid is None:
            return None
        if self._trainer is None or self._trainer.pid != pid:
            try:
                proc = psutil.Process(pid)
            except psutil.Error:
                return None
            if self._trainer is not None:
                self._dead_trainers_cpu_s += self._trainer_cpu_s
            self._trainer, self._trainer_cpu_s = proc, 0.0
        return self._trainer

    @staticmethod
    def _cpu_rss(proc: psutil.Process | None) -> tuple[float, float] | None:
        if proc is None:
            return None
        try:
            with proc.oneshot():
                t = proc.cpu_times()
                return t.user + t.system, proc.memory_info().rss / MB
        except psutil.Error:
            return None

    def _own_cpu_s(self) -> float:
        agent = self._cpu_rss(self.agent)
        trainer = self._cpu_rss(self._trainer_proc())
        if trainer is not None:
            self._trainer_cpu_s = trainer[0]
        return (agent[0] if agent else 0.0) + self._dead_trainers_cpu_s + self._trainer_cpu_s

    def _integrate(self) -> tuple[float, float, float]:
        """Close the interval since the last reading; returns (monotonic now, cpu s now, clock now)."""
        now, stamp, cpu_s = self._monotonic(), self.clock(), self._cpu_time_s()
        frozen_s = self.freeze.frozen_s if self.freeze is not None else 0.0
        last_t, last_cpu, last_frozen = self._last
        dt = now - last_t
        uncharged_s = min(dt, frozen_s - last_frozen) if self.offline == "powered-off" else 0.0
        charged_s = dt - uncharged_s
        if charged_s > 0:
            self.utilisation = min(1.0, max(0.0, (cpu_s - last_cpu) / (self._cores() * charged_s)))
        self.meter.sample(uncharged_s, t_s=now)
        self._last = (now, cpu_s, frozen_s)
        return now, cpu_s, stamp

    def mark(self) -> float:
        """Bring the energy integral up to now (no row); returns the cumulative energy in J."""
        self._integrate()
        return self.meter.energy_j

    def sample(self, state: str) -> TelemetrySample:
        # The row's time is read with the interval's end, not after the slower reads below: on a
        # throttled board those can take tens of ms, which would skew Σ power_w · Δt.
        now, cpu_s, stamp = self._integrate()
        row_t, row_cpu, row_energy = self._row
        energy_j, span_s = self.meter.energy_j, now - row_t
        cpu_pct = max(0.0, 100.0 * (cpu_s - row_cpu) / (self._cores() * span_s)) if span_s > 0 else 0.0
        power_w: float | None = (energy_j - row_energy) / span_s if span_s > 0 else None
        if self.meter.read_errors and self.meter.n_samples == 0:
            power_w = None  # no good reading yet: the source is failing
        self._row = (now, cpu_s, energy_j)
        agent, trainer = self._cpu_rss(self.agent), self._cpu_rss(self._trainer)
        gpu = self.gpu.read() if self.gpu is not None else None
        return TelemetrySample(
            t=stamp, state=state, cpu_pct=round(min(cpu_pct, 100.0), 2),
            rss_agent_mb=round(agent[1] if agent else 0.0, 2), rss_trainer_mb=round(trainer[1] if trainer else 0.0, 2),
            mem_limit_mb=self.limits.mem_limit_mb(), cpu_quota_cores=self.limits.cpu_quota_cores(),
            power_w=round(power_w, 6) if power_w is not None and math.isfinite(power_w) else None,
            energy_j=round(energy_j, 6),
            **({} if gpu is None else {"gpu_pct": gpu.load_pct, "gpu_mem_mb": gpu.mem_mb,
                                       "gpu_energy_j": gpu.rail_energy_j}),
        )
