"""Time dilation: run a fleet the host cannot serve in real time slowed down by one factor.

A board is emulated by a CPU quota (testbed.calibrate.board_quota_cores). When the fleet's
quotas add up to Q cores and the host can give the devices only C, every device that trains
while the others do gets less than its quota, and the boards' speed ratios bend (measured on
this 2-core host before dilation: Pi 4 / Pi 5 step ratio 1.1-1.17 where the boards differ by
2.8x). With dilation delta = Q / C every quota is divided by delta and every time constant of
the campaign multiplied by it in wall time, so each board still gets the same CPU per unit of
its own (board) time, and every reported time is board time = wall time / delta.

C = host cores - a reserve for the broker, the server and the harness - what other tenants of
the host use right now (measured over a short window from /proc/stat before launch). A load
that starts later is caught by the CPU weights (cpu.shares / cpu.weight in proportion to the
quotas, so the devices lose speed in the same proportion) and by the delivered-CPU check in
the report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ConfigError

DEFAULT_RESERVE_CORES = 0.5  # broker + server + runner: ~7 % of this 2-core host measured, plus evaluation bursts
MIN_CAPACITY_CORES = 0.5  # the floor of C, however busy the host looks at launch
BACKGROUND_WINDOW_S = 1.0


@dataclass(frozen=True)
class Dilation:
    """How a campaign's wall time relates to its boards' time."""

    factor: float  # delta >= 1: wall seconds per board second
    setting: str  # "auto", "off" or the number the campaign gave
    demand_cores: float  # Q: the fleet's board quotas, summed
    capacity_cores: float  # C: what the host can give the devices
    host_cores: int
    reserve_cores: float
    background_cores: float  # other tenants' use, measured before launch

    @property
    def oversubscribed(self) -> bool:
        """The dilated quotas still add up to more than the host can give."""
        return self.demand_cores / self.factor > self.capacity_cores * (1 + 1e-6)

    def wall_s(self, board_s: float) -> float:
        return board_s * self.factor

    def board_s(self, wall_s: float) -> float:
        return wall_s / self.factor

    def describe(self) -> str:
        """One plain line for the terminal and the report."""
        if self.factor > 1:
            head = f"time dilation {self.factor:.1f}×"
        else:
            head = "time dilation off" if self.setting == "off" else "no time dilation needed"
        return (f"{head}: the fleet needs {self.demand_cores:.2f} cores, the host can give {self.capacity_cores:.2f} "
                f"({self.host_cores} cores - {self.reserve_cores:g} reserved - {self.background_cores:.2f} in use by "
                "others); all times are board seconds (wall / dilation)")

    def warning(self) -> str | None:
        if not self.oversubscribed:
            return None
        return (f"CPU OVERSUBSCRIBED: the fleet's quotas add up to {self.demand_cores / self.factor:.2f} cores but the "
                f"host can give {self.capacity_cores:.2f} (dilation {self.setting}); devices that train together get "
                "less than their quota, so board speed ratios are NOT faithful. Use [throttle] dilation = \"auto\"")

    def as_dict(self) -> dict[str, float | str | int | bool]:
        return {"factor": round(self.factor, 4), "setting": self.setting, "demand_cores": round(self.demand_cores, 4),
                "capacity_cores": round(self.capacity_cores, 4), "host_cores": self.host_cores,
                "reserve_cores": self.reserve_cores, "background_cores": round(self.background_cores, 4),
                "oversubscribed": self.oversubscribed}


def parse_setting(where: str, value: object) -> str | float:
    """`[throttle] dilation`: "auto", "off" or a number >= 1."""
    if value in ("auto", "off"):
        return str(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 1:
        return float(value)
    raise ConfigError(f"{where}: [throttle] dilation must be \"auto\", \"off\" or a number >= 1; got {value!r}")


def plan_dilation(setting: str | float, quotas: Sequence[float], host_cores: int,
                  reserve_cores: float = DEFAULT_RESERVE_CORES, background_cores: float = 0.0) -> Dilation:
    demand = float(sum(quotas))
    if reserve_cores >= host_cores:
        raise ConfigError(f"[throttle] reserve_cores = {reserve_cores:g} leaves nothing of this host's "
                          f"{host_cores} cores")
    # Floored, so a burst of other work at launch slows a campaign down but never refuses it.
    capacity = max(MIN_CAPACITY_CORES, host_cores - reserve_cores - background_cores)
    if setting == "off":
        factor = 1.0
    elif setting == "auto":
        # Rounded up to 0.01 so the factor reads the same everywhere it is printed.
        factor = max(1.0, math.ceil(demand / capacity * 100 - 1e-9) / 100)
    else:
        factor = float(setting)
    label = setting if isinstance(setting, str) else f"{setting:g}"
    return Dilation(factor, label, demand, capacity, host_cores, reserve_cores, background_cores)


def _cpu_jiffies(stat: Path) -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from the first line of /proc/stat."""
    fields = [int(x) for x in stat.read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def background_cores(host_cores: int, window_s: float = BACKGROUND_WINDOW_S, stat: Path = Path("/proc/stat")) -> float:
    """Cores other processes keep busy, averaged over `window_s` (this process sleeps meanwhile)."""
    busy0, total0 = _cpu_jiffies(stat)
    time.sleep(window_s)
    busy1, total1 = _cpu_jiffies(stat)
    if total1 <= total0:
        return 0.0
    return max(0.0, min(float(host_cores), host_cores * (busy1 - busy0) / (total1 - total0)))
