"""Throttle backends: make one host behave like a fleet of boards, one cgroup per device.

    throttle = detect_throttle(prefix="orchard", run_id="campaign-7")   # cgroup2, cgroup1 or none
    group = throttle.create("rpi4-03", cpu_quota_cores=0.9, mem_limit_mb=3584)
    group.add_pid(proc.pid)            # children it starts afterwards inherit the group
    group.set_cpu_quota(0.45)          # rewritten live from CPU traces
    group.set_cpu_weight(0.9)          # cpu.shares / cpu.weight in proportion to the quota
    harness = throttle.create_harness(0.5)   # broker + server: weighted, unlimited, not closed by close()
    group.freeze(); group.thaw()       # offline = frozen: keepalives stop, the broker fires the LWT
    group.stats()                      # cpu_usage_s, mem_peak_mb, oom_kills, nr_throttled, ...
    group.oom_kills()                  # the same counter alone: one file, for per-loop polling
    throttle.close()                   # or cleanup_all("orchard") on Ctrl-C / after a crash

The "none" backend keeps the interface but throttles nothing; its `warning` says so loudly and
the report shows it. The v2 backend and what both share live in `testbed.cgroup_backends`, v1 in `testbed.cgroup_v1`,
file-level mechanics
and the seam unit tests fake (`CgroupFs`) in `testbed.cgroups`.
"""

from __future__ import annotations

import contextlib
import os
import signal
from os.path import join
from typing import Protocol

from runtime.errors import OrchardError
from testbed.cgroup_backends import V2Throttle, registered_groups
from testbed.cgroup_v1 import V1Throttle
from testbed.cgroups import (
    DEFAULT_ROOT,
    CgroupFs,
    GroupStats,
    check_name,
    check_weight_cores,
    cpu_quota_us,
    default_run_id,
    host_cpu_cores,
    mem_limit_bytes,
    remove_trees,
)

__all__ = [
    "DeviceGroup",
    "GroupStats",
    "NullThrottle",
    "Throttle",
    "V1Throttle",
    "V2Throttle",
    "cleanup_all",
    "detect_throttle",
]


class DeviceGroup(Protocol):
    """One emulated board. Limits apply live; freeze/thaw return once the kernel reports the new
    state; destroy() thaws, kills what is left, removes the group and is idempotent. Every method
    raises ConfigError for bad values and OrchardError (naming the cgroup file) for kernel refusals."""

    @property
    def name(self) -> str: ...
    @property
    def cpu_quota_cores(self) -> float | None: ...
    @property
    def mem_limit_mb(self) -> int | None: ...
    def add_pid(self, pid: int) -> None: ...
    def set_cpu_quota(self, cores: float | None) -> None: ...
    def set_cpu_weight(self, cores: float) -> None: ...
    def set_mem_limit(self, mb: int | None) -> None: ...
    def freeze(self) -> None: ...
    def thaw(self) -> None: ...
    def stats(self) -> GroupStats: ...
    def oom_kills(self) -> int | None: ...  # stats().oom_kills, read cheaply
    def destroy(self) -> None: ...


class Throttle(Protocol):
    """Makes device groups under `<prefix>/<run_id>/`; close() destroys the ones it made."""

    @property
    def backend(self) -> str: ...  # "cgroup2" | "cgroup1" | "none"
    @property
    def warning(self) -> str | None: ...  # shown in the report whenever set
    @property
    def run_id(self) -> str: ...
    def create(self, name: str, cpu_quota_cores: float | None, mem_limit_mb: int | None) -> DeviceGroup: ...
    def create_harness(self, weight_cores: float) -> DeviceGroup | None: ...  # broker + server; caller destroys
    def prioritise_cpu(self) -> None: ...  # after create(): the quotas, not other tenants, bind
    def close(self) -> None: ...


# --------------------------------------------------------------------------------------- none
class NullGroup:
    """Throttles nothing; remembers its pids (with start times, so a reused pid is never killed)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cpu_quota_cores: float | None = None
        self.mem_limit_mb: int | None = None
        self._pids: dict[int, str] = {}

    def add_pid(self, pid: int) -> None:
        start = _start_time(pid)
        if start is not None:
            self._pids[pid] = start

    def set_cpu_quota(self, cores: float | None) -> None:
        cpu_quota_us(cores, host_cpu_cores())  # same validation as the real backends
        self.cpu_quota_cores = cores

    def set_cpu_weight(self, cores: float) -> None:
        check_weight_cores(cores)

    def set_mem_limit(self, mb: int | None) -> None:
        mem_limit_bytes(mb)
        self.mem_limit_mb = mb

    def freeze(self) -> None:
        pass

    def thaw(self) -> None:
        pass

    def stats(self) -> GroupStats:
        live = tuple(pid for pid, start in self._pids.items() if _start_time(pid) == start)
        return GroupStats(cpu_usage_s=0.0, nr_periods=0, nr_throttled=0, throttled_s=0.0, mem_current_mb=0.0,
                          mem_peak_mb=0.0, mem_limit_hits=0, oom_kills=None, frozen=False, pids=live)

    def oom_kills(self) -> int | None:
        return None

    def destroy(self) -> None:
        for pid in self.stats().pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._pids.clear()


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22, after the "(comm)" field
    except (OSError, IndexError):
        return None


class NullThrottle:
    backend = "none"

    def __init__(self, warning: str, run_id: str | None = None) -> None:
        self.warning: str | None = warning
        self.run_id = run_id or default_run_id()
        self._groups: list[NullGroup] = []

    def create(self, name: str, cpu_quota_cores: float | None, mem_limit_mb: int | None) -> NullGroup:
        group = NullGroup(check_name("device name", name))
        group.set_cpu_quota(cpu_quota_cores)
        group.set_mem_limit(mem_limit_mb)
        self._groups.append(group)
        return group

    def create_harness(self, weight_cores: float) -> None:
        check_weight_cores(weight_cores)  # nothing is weighted here, so there is no group to be in

    def prioritise_cpu(self) -> None:
        pass

    def close(self) -> None:
        for group in self._groups:
            group.destroy()
        self._groups.clear()


# ------------------------------------------------------------------------------ entry points
def detect_throttle(root: str = DEFAULT_ROOT, prefix: str = "orchard", *, run_id: str | None = None,
                    required: bool = False, host_cores: int | None = None,
                    fs: CgroupFs | None = None) -> Throttle:
    """cgroup2 if `root` is a unified hierarchy, cgroup1 if the v1 controllers are mounted there
    (hybrid hosts included), else "none" with a warning, or OrchardError if `required`."""
    fs = fs or CgroupFs()
    check_name("cgroup prefix", prefix)
    if run_id is not None:  # a bad name is the caller's error, never a reason to run unthrottled
        check_name("run id", run_id)
    try:
        if fs.exists(join(root, "cgroup.controllers")):
            return V2Throttle(root, prefix, run_id=run_id, host_cores=host_cores, fs=fs)
        if fs.exists(join(root, "cpu", "cpu.cfs_quota_us")):
            return V1Throttle(root, prefix, run_id=run_id, host_cores=host_cores, fs=fs)
        reason = f"no cgroup v2 or v1 hierarchy at {root}"
    except OrchardError as exc:
        reason = str(exc)
    if required:
        raise OrchardError(f"throttling required but unavailable: {reason}")
    return NullThrottle(
        f"THROTTLING DISABLED ({reason}): devices run with the host's full CPU and memory, so "
        "timings, memory caps and OOMs do NOT reflect the boards", run_id)


def cleanup_all(prefix: str = "orchard", root: str = DEFAULT_ROOT, *,
                fs: CgroupFs | None = None) -> list[str]:
    """Thaw, kill and remove every group under `<root>[/<controller>]/<prefix>`: the ones this process
    made, then whatever a crashed run left. For Ctrl-C handlers and tests. Returns removed dirs."""
    check_name("cgroup prefix", prefix)
    fs = fs or CgroupFs()
    errors: list[str] = []
    removed: list[str] = []
    for group in registered_groups():
        if group.place.root == root and group.place.prefix == prefix:
            removed.extend(group.place.leaves)
            try:
                group.destroy()
            except OrchardError as exc:
                errors.append(str(exc))
    hierarchies = [root] if fs.exists(join(root, "cgroup.procs")) else []
    if fs.exists(root) and not hierarchies:  # v1: each controller is its own hierarchy
        hierarchies = [d for d in fs.subdirs(root) if fs.exists(join(d, "cgroup.procs"))]
    tops = list(dict.fromkeys(os.path.realpath(join(h, prefix)) for h in hierarchies))
    try:
        removed.extend(remove_trees(fs, tops))
    except OrchardError as exc:
        errors.append(str(exc))
    if errors:
        raise OrchardError(f"cleanup of cgroups under {prefix!r} left some behind: {'; '.join(errors)}")
    return removed
