"""The process-tree sampler of the testbed bench (bench/testbed_bench.py): cumulative CPU per
process class (runner, server, broker, devices, other), the device cgroups' CPU accounting,
device memory and the server's telemetry lag, every SAMPLE_S. See testbed_bench's docstring
for what each figure means."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from pathlib import Path

import psutil

CGROUP_ROOT = "/sys/fs/cgroup"
SAMPLE_S = 0.5
LAG_EVERY_S = 2.0
CLASSES = ("runner", "server", "broker", "devices", "other")
HARNESS = ("runner", "server", "broker")


def _classify(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    if "-m server" in text:
        return "server"
    if "testbed.broker" in text or "amqtt" in text:
        return "broker"
    if "-m runtime" in text:
        return "devices"
    return "other"


def _proc_cgroups(pid: int) -> list[str]:
    """cgroupfs dirs of a process under an `orchard` prefix (v1: one per controller; v2: one)."""
    dirs = []
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "/orchard/" not in path + "/":
                continue
            if not controllers:
                dirs.append(CGROUP_ROOT + path)
            for c in controllers.split(","):
                if c and not c.startswith("name="):
                    dirs.append(f"{CGROUP_ROOT}/{c}{path}")
    return dirs


def _read_usage_s(group_dir: str) -> float | None:
    """CPU seconds a device group received: v1 cpuacct.usage, v2 cpu.stat usage_usec; None elsewhere."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path(group_dir, "cpuacct.usage").read_text()) / 1e9
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(group_dir, "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6
    return None


def _runqueue_wait_s(pid: int) -> float | None:
    """Seconds the process's threads have waited runnable for a CPU (/proc/<pid>/schedstat, 2nd
    field; the main thread only, where the server's and broker's work runs)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    return None


def _last_t(path: Path) -> float | None:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 400))
            lines = f.read().decode(errors="replace").strip().splitlines()
        return float(lines[-1].split(",", 1)[0]) if len(lines) > 1 else None
    except (OSError, ValueError, IndexError):
        return None


class TreeSampler(threading.Thread):
    """Cumulative CPU per process class of one campaign's process tree, plus cgroups, memory and
    the server's telemetry lag, sampled every SAMPLE_S until stop()."""

    def __init__(self, root_pid: int, run: Path) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.run_dir = run
        self.halt = threading.Event()
        self.cls: dict[tuple[int, float], str] = {}
        self.cpu: dict[tuple[int, float], float] = {}
        self.procs: dict[tuple[int, float], psutil.Process] = {}
        self.groups: dict[str, float] = {}  # cpuacct / cpu.stat dir -> last usage seconds
        self.all_group_dirs: set[str] = set()  # every controller dir of every device group
        self.usage_dirs: set[str] = set()  # one CPU-accounting dir per device group
        self.series: list[tuple[float, dict[str, float], float]] = []  # (wall t, cumulative per class, host busy s)
        # (wall t, the newest t_s of every devices/<id>.csv): t_s is board time, so the lag is
        # worked out once the run's clock (start, dilation) is known
        self.newest_ticks: list[tuple[float, list[float]]] = []
        self.usage_series: dict[str, list[tuple[float, float]]] = {}  # device id -> (wall t, cgroup CPU s)
        self.harness_groups: dict[str, list[str]] = {}  # server / broker -> the cgroup leaf names it sat in
        self.wait: dict[tuple[int, float], float] = {}  # harness process -> run-queue wait s (last seen)
        self.wait_series: list[tuple[float, dict[str, float]]] = []  # (wall t, cumulative wait per harness class)
        self.peak_devices_rss_mb = 0.0
        self.peak_device_rss_mb = 0.0
        self.peak_agent_rss_mb: dict[int, float] = {}  # agent pid -> its peak RSS
        self.peak_tracker_rss_mb: dict[int, float] = {}  # agent pid -> multiprocessing's resource tracker
        self._trackers: dict[tuple[int, float], bool] = {}
        self.agent_keys: set[tuple[int, float]] = set()  # device processes: agents ...
        self.trainer_keys: set[tuple[int, float]] = set()  # ... and the trainers they started
        self.peak_trainer_rss_mb: dict[int, float] = {}  # agent pid -> the peak RSS of its trainer(s)
        self.min_available_mb = psutil.virtual_memory().available / 2**20
        self.errors: list[str] = []
        self._next_lag = 0.0

    def stop(self) -> None:
        self.halt.set()
        self.join(10)

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.sample()
            except Exception as exc:  # a sampler bug must not hang the bench
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self.halt.wait(SAMPLE_S)
        with contextlib.suppress(Exception):
            self.sample()

    def sample(self) -> None:
        now = time.time()
        try:
            root = psutil.Process(self.root_pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        seen: dict[int, tuple[psutil.Process, tuple[int, float], int]] = {}
        for p in tree:
            with contextlib.suppress(psutil.Error):
                seen[p.pid] = (p, (p.pid, p.create_time()), p.ppid())

        def kind_of(pid: int) -> str | None:
            if pid not in seen:
                return None
            p, key, ppid = seen[pid]
            # "other" is looked at again: between fork and exec a child still shows the runner's
            # command line, and the runner forks every server, broker and device process.
            if self.cls.get(key, "other") == "other":
                parent = kind_of(ppid) if ppid != pid else None
                if pid == self.root_pid:
                    kind = "runner"
                elif parent == "devices":  # the trainer the agent spawns, and anything below it
                    kind = "devices"
                else:
                    try:
                        kind = _classify(p.cmdline())
                    except psutil.Error:
                        kind = "other"
                    if kind == "devices":
                        self._add_groups(pid)
                self.cls[key] = kind
                self.procs[key] = p
            return self.cls[key]

        rss_by_device: dict[int, float] = {}
        for pid, (p, key, ppid) in seen.items():
            kind = kind_of(pid)
            if kind in HARNESS and (wait := _runqueue_wait_s(pid)) is not None:
                self.wait[key] = wait
            if kind in ("server", "broker"):  # the run's harness group (the broker joins it once up)
                dirs = _proc_cgroups(pid)
                self.all_group_dirs.update(dirs)
                # every group it was seen in: an exiting process reads as the root group
                self.harness_groups[kind] = sorted(set(self.harness_groups.get(kind, ()))
                                                   | {os.path.basename(d) for d in dirs})
            try:
                t = p.cpu_times()
                self.cpu[key] = t.user + t.system
                if kind == "devices":
                    is_trainer = kind_of(ppid) == "devices"
                    agent = ppid if is_trainer else pid
                    rss = p.memory_info().rss / 2**20
                    rss_by_device[agent] = rss_by_device.get(agent, 0.0) + rss
                    tracker = is_trainer and self._is_tracker(key, p)
                    peaks = (self.peak_tracker_rss_mb if tracker else self.peak_trainer_rss_mb) if is_trainer \
                        else self.peak_agent_rss_mb
                    peaks[agent] = max(peaks.get(agent, 0.0), rss)
                    (self.trainer_keys if is_trainer else self.agent_keys).add(key)
            except psutil.Error:
                continue
        for d in self.usage_dirs:
            usage = _read_usage_s(d)
            if usage is not None:
                self.groups[d] = usage
                self.usage_series.setdefault(os.path.basename(d), []).append((time.time(), usage))
        totals = dict.fromkeys(CLASSES, 0.0)
        for key, cpu in self.cpu.items():
            totals[self.cls[key]] += cpu
        h = psutil.cpu_times()
        busy = h.user + h.nice + h.system + getattr(h, "irq", 0.0) + getattr(h, "softirq", 0.0) + getattr(
            h, "steal", 0.0)
        self.series.append((now, totals, busy))
        waits = dict.fromkeys(HARNESS, 0.0)
        for key, wait in self.wait.items():
            waits[self.cls[key]] += wait
        self.wait_series.append((now, waits))
        if rss_by_device:
            self.peak_devices_rss_mb = max(self.peak_devices_rss_mb, sum(rss_by_device.values()))
            self.peak_device_rss_mb = max(self.peak_device_rss_mb, max(rss_by_device.values()))
        self.min_available_mb = min(self.min_available_mb, psutil.virtual_memory().available / 2**20)
        if now >= self._next_lag:
            self._next_lag = now + LAG_EVERY_S
            newest = [t for f in (self.run_dir / "devices").glob("*.csv") if (t := _last_t(f)) is not None]
            if newest:
                self.newest_ticks.append((now, newest))

    def _add_groups(self, pid: int) -> None:
        for d in _proc_cgroups(pid):
            self.all_group_dirs.add(d)
            real = os.path.realpath(d)
            if real not in self.usage_dirs and _read_usage_s(real) is not None:
                self.usage_dirs.add(real)

    def at(self, t: float) -> tuple[dict[str, float], float]:
        """Cumulative CPU per class and host busy seconds at wall time t (linear between samples)."""
        s = self.series
        if not s:
            return dict.fromkeys(CLASSES, 0.0), 0.0
        if t <= s[0][0]:
            return dict(s[0][1]), s[0][2]
        for (t0, a, h0), (t1, b, h1) in itertools.pairwise(s):
            if t0 <= t <= t1:
                w = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
                return {k: a[k] + w * (b[k] - a[k]) for k in CLASSES}, h0 + w * (h1 - h0)
        return dict(s[-1][1]), s[-1][2]

    def wait_at(self, t: float) -> dict[str, float]:
        """Cumulative run-queue wait per harness class at wall time t (the sample at or before it)."""
        last = dict.fromkeys(HARNESS, 0.0)
        for t0, waits in self.wait_series:
            if t0 > t:
                break
            last = waits
        return dict(last)

    def _is_tracker(self, key: tuple[int, float], p: psutil.Process) -> bool:
        """A child of an agent that is multiprocessing's resource tracker, not its trainer."""
        if key not in self._trackers:
            try:
                self._trackers[key] = "resource_tracker" in " ".join(p.cmdline())
            except psutil.Error:
                return False
        return self._trackers[key]

    def device_cpu_split(self) -> dict[str, float]:
        """CPU seconds of the agents and of their trainers over the whole run (last samples)."""
        return {"agents_cpu_s": round(sum(self.cpu.get(k, 0.0) for k in self.agent_keys), 3),
                "trainers_cpu_s": round(sum(self.cpu.get(k, 0.0) for k in self.trainer_keys), 3)}

    def alive_tree(self) -> list[psutil.Process]:
        alive = []
        for (_pid, created), p in self.procs.items():
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        return alive
