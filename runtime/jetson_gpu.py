"""A Jetson's integrated GPU, read from sysfs as jetson-stats' jtop finds it: load, memory, rail.

    /sys/class/devfreq/<dev>/device/of_node/name   gv11b (Xavier) | gp10b (TX2) | ga10b (Orin, JP5) |
                                                   gpu (Orin on JP6, Nano): which devfreq entry is the GPU
    /sys/class/devfreq/<dev>/device/load           GPU load in per mille (523 = 52.3 %)
    /proc/meminfo  NvMapMemUsed: N kB              memory the GPU (nvmap) holds; it is shared DRAM, so
                                                   it also shows in MemTotal - MemAvailable
    INA3221 rail with GPU in its label             POM_5V_GPU (Nano), VDD_GPU_SOC (AGX Orin),
                                                   VDD_CPU_GPU_CV (Orin Nano/NX, Xavier NX: CPU+GPU+CV)

NvMapMemUsed is NVIDIA's documented, non-root figure for "device allocated memory" (CUDA for
Tegra, memory management); the per-process split in /sys/kernel/debug/nvmap needs root. The
GPU rail's energy is integrated here on its own; the board total stays the sensor's total rail.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from runtime.power_sensors import PowerReadError, PowerSource, gpu_rail, read_number, read_text
from runtime.record import record

GPU_NODE_NAMES = ("gv11b", "gp10b", "ga10b", "gb10b", "gpu")


@record
class GpuReading:
    load_pct: float | None
    mem_mb: float | None
    rail_energy_j: float | None  # cumulative, of the GPU rail, since the reader started


class JetsonGpu:
    def __init__(self, load_file: Path, meminfo: Path, source: PowerSource | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.load_file, self.meminfo = load_file, meminfo
        self.rail = gpu_rail(source) if source is not None else None
        self._clock = clock
        self._energy_j = 0.0
        self._last: tuple[float, float] | None = None  # (t, W) of the last rail reading

    @classmethod
    def detect(cls, sysfs_root: str | Path = "/", source: PowerSource | None = None,
               clock: Callable[[], float] = time.monotonic) -> JetsonGpu | None:
        """The board's integrated GPU, or None where there is none (a Pi, an x86 host)."""
        root = Path(sysfs_root)
        for entry in sorted((root / "sys/class/devfreq").glob("*")):
            name_file = entry / "device" / "of_node" / "name"
            try:
                name = read_text(name_file).rstrip("\0")
            except PowerReadError:
                continue
            if name in GPU_NODE_NAMES and (entry / "device" / "load").is_file():
                return cls(entry / "device" / "load", root / "proc/meminfo", source, clock)
        return None

    @property
    def rail_label(self) -> str | None:
        return self.rail.label if self.rail is not None else None

    def _load_pct(self) -> float | None:
        try:
            return min(100.0, max(0.0, read_number(self.load_file) / 10.0))
        except PowerReadError:
            return None

    def _mem_mb(self) -> float | None:
        try:
            for line in self.meminfo.read_text().splitlines():
                if line.startswith("NvMapMemUsed:"):
                    return float(line.split()[1]) / 1024.0  # kB
        except (OSError, ValueError, IndexError):
            return None
        return None

    def _rail_energy_j(self) -> float | None:
        if self.rail is None:
            return None
        now = self._clock()
        try:
            power_w = self.rail.power_w()
        except PowerReadError:
            return self._energy_j if self._last is not None else None
        if self._last is not None:  # trapezoid over the interval since the last reading
            last_t, last_w = self._last
            self._energy_j += 0.5 * (last_w + power_w) * max(0.0, now - last_t)
        self._last = (now, power_w)
        return self._energy_j

    def read(self) -> GpuReading:
        return GpuReading(self._load_pct(), self._mem_mb(), self._rail_energy_j())
