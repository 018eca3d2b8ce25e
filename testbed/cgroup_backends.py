"""The cgroup backends' common part (a group per device, its live limits, freezing, counters and
removal) and the v2 backend; v1 is in `testbed.cgroup_v1`. `testbed.throttle` is the public face;
`testbed.cgroups` holds the file-level mechanics."""

from __future__ import annotations

import atexit
import sys
import threading
import time
from abc import ABC, abstractmethod
from os.path import dirname, join

from runtime.errors import ConfigError, OrchardError
from testbed.cgroups import (
    DEFAULT_ROOT,
    FREEZE_TIMEOUT_S,
    MIB,
    POLL_S,
    CgroupFs,
    GroupPlace,
    GroupStats,
    check_name,
    check_weight_cores,
    cpu_period_us,
    cpu_quota_us,
    default_run_id,
    get,
    host_cpu_cores,
    make_group_dirs,
    mem_limit_bytes,
    parse_keyed,
    probe_writable,
    prune_empty,
    put,
    read_pids,
    remove_trees,
)

# Every live group this process made, so cleanup_all() and atexit can find them.
_registry: dict[str, CgroupGroup] = {}
_registry_lock = threading.Lock()
tree_lock = threading.Lock()  # create vs prune of shared parent dirs within this process
HARNESS_GROUP = "harness"  # never a device id: those are `<fleet group>-<i>`


def registered_groups() -> list[CgroupGroup]:
    with _registry_lock:
        return list(_registry.values())


@atexit.register
def _destroy_registered_at_exit() -> None:
    for group in registered_groups():
        try:
            group.destroy()
        except OrchardError as exc:
            print(f"orchard: could not remove cgroup at exit: {exc}", file=sys.stderr)


class CgroupGroup(ABC):
    """What v1 and v2 groups share: validation, locking, freeze polling, destroy, registry."""

    backend: str

    def __init__(self, place: GroupPlace, fs: CgroupFs, host_cores: int) -> None:
        self.place = place
        self.name = place.name
        self.cpu_quota_cores: float | None = None
        self.mem_limit_mb: int | None = None
        self._fs = fs
        self._host_cores = host_cores
        self._lock = threading.RLock()
        self._destroyed = False
        self._peak_seen_bytes = 0
        with _registry_lock:
            _registry[place.leaves[0]] = self

    @property
    def path(self) -> str:
        return self.place.leaves[0]

    def _check_live(self) -> None:
        if self._destroyed:
            raise OrchardError(f"device group {self.name} at {self.path} was already destroyed")

    def add_pid(self, pid: int) -> None:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ConfigError(f"pid {pid!r} is not a process id")
        with self._lock:
            self._check_live()
            for leaf in self.place.leaves:
                put(self._fs, join(leaf, "cgroup.procs"), str(pid))

    def set_cpu_quota(self, cores: float | None) -> None:
        quota_us = cpu_quota_us(cores, self._host_cores)
        with self._lock:
            self._check_live()
            self._write_cpu_quota(quota_us, cpu_period_us(cores))
            self.cpu_quota_cores = cores

    def set_cpu_weight(self, cores: float) -> None:
        """CPU weight in proportion to `cores` (a device's quota), so that under contention from
        outside the campaign every device loses the same share of its quota."""
        check_weight_cores(cores)
        with self._lock:
            self._check_live()
            self._write_cpu_weight(cores)

    def set_mem_limit(self, mb: int | None) -> None:
        limit_bytes = mem_limit_bytes(mb)
        with self._lock:
            self._check_live()
            self._write_mem_limit(limit_bytes)
            self.mem_limit_mb = mb

    def freeze(self) -> None:
        self._set_frozen(True)

    def thaw(self) -> None:
        self._set_frozen(False)

    def _set_frozen(self, frozen: bool) -> None:
        with self._lock:
            self._check_live()
            deadline = time.monotonic() + FREEZE_TIMEOUT_S
            next_write = 0.0
            while True:
                now = time.monotonic()
                if now >= next_write:  # re-request now and then: a v1 freeze can stall in FREEZING
                    self._write_frozen(frozen)
                    next_write = now + 0.25
                if self._read_frozen() == frozen:
                    return
                if now > deadline:
                    state = "frozen" if frozen else "thawed"
                    raise OrchardError(
                        f"device group {self.name} at {self.path} did not become {state} within "
                        f"{FREEZE_TIMEOUT_S:g} s (a task stuck in uninterruptible I/O?)"
                    )
                time.sleep(POLL_S)

    def stats(self) -> GroupStats:
        with self._lock:
            self._check_live()
            return self._read_stats()

    def oom_kills(self) -> int | None:
        """stats().oom_kills from one file: the runner asks every device this at every loop."""
        with self._lock:
            self._check_live()
            return self._read_oom_kills()

    def _peak(self, current_bytes: int, kernel_peak_bytes: int | None) -> float:
        self._peak_seen_bytes = max(self._peak_seen_bytes, current_bytes, kernel_peak_bytes or 0)
        return self._peak_seen_bytes / MIB

    def destroy(self) -> None:
        """Kill what is left (thawing first), remove the group and any parents it leaves empty."""
        with self._lock:
            if self._destroyed:
                return
            with tree_lock:
                remove_trees(self._fs, self.place.leaves)
                for leaf, top in zip(self.place.leaves, self.place.hierarchy_roots, strict=True):
                    prune_empty(self._fs, dirname(leaf), top)
            self._destroyed = True
        with _registry_lock:
            _registry.pop(self.path, None)

    @abstractmethod
    def _write_cpu_quota(self, quota_us: int | None, period_us: int) -> None: ...

    @abstractmethod
    def _write_cpu_weight(self, cores: float) -> None: ...

    @abstractmethod
    def _write_mem_limit(self, limit_bytes: int | None) -> None: ...

    @abstractmethod
    def _write_frozen(self, frozen: bool) -> None: ...

    @abstractmethod
    def _read_frozen(self) -> bool: ...

    @abstractmethod
    def _read_stats(self) -> GroupStats: ...

    @abstractmethod
    def _read_oom_kills(self) -> int | None: ...


class _CgroupThrottle:
    """Shared by both cgroup backends: validation before any mkdir, and close()."""

    backend = ""

    def __init__(self, root: str, prefix: str, run_id: str | None, host_cores: int | None,
                 fs: CgroupFs | None) -> None:
        self.root = root
        self.prefix = check_name("cgroup prefix", prefix)
        self.run_id = check_name("run id", run_id or default_run_id())
        self.host_cores = host_cores or host_cpu_cores()
        self.warning: str | None = None
        self._fs = fs or CgroupFs()
        self._groups: list[CgroupGroup] = []
        self._lock = threading.Lock()

    def create(self, name: str, cpu_quota_cores: float | None, mem_limit_mb: int | None) -> CgroupGroup:
        check_name("device name", name)
        cpu_quota_us(cpu_quota_cores, self.host_cores)  # ConfigError before touching cgroupfs
        mem_limit_bytes(mem_limit_mb)
        group = self._make(name)
        try:
            group.set_cpu_quota(cpu_quota_cores)
            group.set_mem_limit(mem_limit_mb)
        except BaseException:
            group.destroy()
            raise
        with self._lock:
            self._groups.append(group)
        return group

    def create_harness(self, weight_cores: float) -> CgroupGroup:
        """The run's group for its broker and server, next to the devices: no quota, a CPU weight of
        `weight_cores` (the reserve dilation leaves them). In the root group they queued behind the
        prioritised device tree and every other tenant (150-600x their CPU time in run-queue wait
        with 128 saturating devices and a loaded host). Not closed by close(): the broker outlives
        the devices, so the caller destroys it once the broker is gone (atexit otherwise)."""
        check_weight_cores(weight_cores)
        group = self._make(HARNESS_GROUP)
        try:
            group.set_cpu_quota(None)
            group.set_mem_limit(None)
            group.set_cpu_weight(weight_cores)
        except BaseException:
            group.destroy()
            raise
        return group

    def prioritise_cpu(self) -> None:
        """Top CPU weight for the prefix and run dirs. The device quotas add up to no more than the
        host can give (time dilation sees to that), so with this the quotas are what binds: other
        tenants that start after launch cannot take the devices' CPU, and cannot bend their ratios."""
        for d in self._weight_dirs():
            self._write_top_weight(d)

    def _weight_dirs(self) -> list[str]:
        raise NotImplementedError

    def _write_top_weight(self, cgroup_dir: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Destroy every group this throttle created (idempotent)."""
        with self._lock:
            groups, self._groups = self._groups, []
        for group in groups:
            group.destroy()

    def _make(self, name: str) -> CgroupGroup:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------- v2
class V2Group(CgroupGroup):
    backend = "cgroup2"

    def _file(self, name: str) -> str:
        return join(self.path, name)

    def _write_cpu_quota(self, quota_us: int | None, period_us: int) -> None:
        if quota_us is None and not self._fs.exists(self._file("cpu.max")):
            return  # no cpu controller (V2Throttle.warning says so): unlimited is all there is
        put(self._fs, self._file("cpu.max"), f"{'max' if quota_us is None else quota_us} {period_us}")

    def _write_cpu_weight(self, cores: float) -> None:
        if self._fs.exists(self._file("cpu.weight")):  # absent without the cpu controller
            # cpu.weight is 1..10000 (100 = default); 1000 per core keeps 0.01-core steps apart.
            put(self._fs, self._file("cpu.weight"), str(min(10000, max(1, round(1000 * cores)))))

    def _write_mem_limit(self, limit_bytes: int | None) -> None:
        if limit_bytes is None and not self._fs.exists(self._file("memory.max")):
            return  # no memory controller, as above
        put(self._fs, self._file("memory.max"), "max" if limit_bytes is None else str(limit_bytes))
        if self._fs.exists(self._file("memory.swap.max")):  # absent without swap accounting
            put(self._fs, self._file("memory.swap.max"), "0")  # host swap must not hide the cap

    def _write_frozen(self, frozen: bool) -> None:
        put(self._fs, self._file("cgroup.freeze"), "1" if frozen else "0")

    def _read_frozen(self) -> bool:
        # cgroup.freeze is the request; cgroup.events "frozen" flips once every task has stopped.
        return parse_keyed(get(self._fs, self._file("cgroup.events"))).get("frozen") == 1

    def _read_stats(self) -> GroupStats:
        fs = self._fs
        cpu = parse_keyed(get(fs, self._file("cpu.stat")))
        has_mem = fs.exists(self._file("memory.current"))
        current = int(get(fs, self._file("memory.current"))) if has_mem else 0
        has_peak = fs.exists(self._file("memory.peak"))  # 5.19+
        kernel_peak = int(get(fs, self._file("memory.peak"))) if has_peak else None
        events = parse_keyed(get(fs, self._file("memory.events"))) if has_mem else {}
        return GroupStats(
            cpu_usage_s=cpu.get("usage_usec", 0) / 1e6,
            nr_periods=cpu.get("nr_periods", 0),
            nr_throttled=cpu.get("nr_throttled", 0),
            throttled_s=cpu.get("throttled_usec", 0) / 1e6,
            mem_current_mb=current / MIB,
            mem_peak_mb=self._peak(current, kernel_peak),
            mem_limit_hits=events.get("max", 0),
            oom_kills=events.get("oom_kill"),  # in memory.events since 4.13
            frozen=self._read_frozen(),
            pids=tuple(read_pids(fs, self.path)),
        )

    def _read_oom_kills(self) -> int | None:
        path = self._file("memory.events")
        return parse_keyed(get(self._fs, path)).get("oom_kill") if self._fs.exists(path) else None


class V2Throttle(_CgroupThrottle):
    """Unified hierarchy: `<root>/<prefix>/<run_id>/<device>`, controllers enabled on the way down."""

    backend = "cgroup2"
    WANTED = ("cpu", "memory")

    def __init__(self, root: str = DEFAULT_ROOT, prefix: str = "orchard", *, run_id: str | None = None,
                 host_cores: int | None = None, fs: CgroupFs | None = None) -> None:
        super().__init__(root, prefix, run_id, host_cores, fs)
        controllers_file = join(root, "cgroup.controllers")
        if not self._fs.exists(controllers_file):
            raise OrchardError(f"{root} is not a cgroup v2 hierarchy (no {controllers_file})")
        available = get(self._fs, controllers_file).split()
        self.controllers = tuple(c for c in self.WANTED if c in available)
        missing = [c for c in self.WANTED if c not in available]
        if missing:
            self.warning = (
                f"cgroup v2 at {root} lacks the {' and '.join(missing)} controller(s) (on a Pi add "
                "cgroup_enable=memory cgroup_memory=1 to cmdline.txt); those limits will fail"
            )
        probe_writable(self._fs, join(root, self.prefix))

    def _weight_dirs(self) -> list[str]:
        return [join(self.root, self.prefix), join(self.root, self.prefix, self.run_id)]

    def _write_top_weight(self, cgroup_dir: str) -> None:
        if self._fs.exists(join(cgroup_dir, "cpu.weight")):
            put(self._fs, join(cgroup_dir, "cpu.weight"), "10000")

    def _enable_controllers(self, cgroup_dir: str) -> None:
        # "No internal processes": only dirs without member processes may enable controllers for
        # children; our prefix and run dirs never hold processes, the root is exempt.
        path = join(cgroup_dir, "cgroup.subtree_control")
        enabled = get(self._fs, path).split()
        todo = [c for c in self.controllers if c not in enabled]
        if todo:
            put(self._fs, path, " ".join(f"+{c}" for c in todo))

    def _make(self, name: str) -> CgroupGroup:
        with tree_lock:
            leaf = make_group_dirs(self._fs, self.root, self.prefix, self.run_id, name,
                                   prepare=self._enable_controllers)
        place = GroupPlace(self.root, self.prefix, self.run_id, name, (leaf,), (self.root,))
        return V2Group(place, self._fs, self.host_cores)
