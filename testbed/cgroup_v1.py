"""The cgroup v1 backend: one dir per device under each of the cpu, cpuacct, memory and freezer
hierarchies (co-mounted ones share a dir). The shared group and throttle logic is in
testbed.cgroup_backends; testbed.throttle picks a backend."""

from __future__ import annotations

import os
from os.path import join

from runtime.errors import OrchardError
from testbed.cgroup_backends import CgroupGroup, _CgroupThrottle, tree_lock
from testbed.cgroups import (
    DEFAULT_ROOT,
    MIB,
    CgroupFs,
    GroupPlace,
    GroupStats,
    get,
    make_group_dirs,
    parse_keyed,
    probe_writable,
    prune_empty,
    put,
    read_pids,
    remove_trees,
)

V1_CONTROLLERS = {  # controller -> a file its hierarchy root always has
    "cpu": "cpu.cfs_quota_us",
    "cpuacct": "cpuacct.usage",
    "memory": "memory.limit_in_bytes",
    "freezer": "cgroup.procs",  # the root freezer group has no freezer.state
}


class V1Group(CgroupGroup):
    backend = "cgroup1"

    def __init__(self, place: GroupPlace, fs: CgroupFs, host_cores: int, dirs: dict[str, str]) -> None:
        super().__init__(place, fs, host_cores)
        self.dirs = dirs  # controller -> leaf dir (cpu and cpuacct may share one when co-mounted)

    def _file(self, controller: str, name: str) -> str:
        return join(self.dirs[controller], name)

    def _write_cpu_quota(self, quota_us: int | None, period_us: int) -> None:
        # Unlimited first: the kernel checks every write against the other file's current value.
        put(self._fs, self._file("cpu", "cpu.cfs_quota_us"), "-1")
        put(self._fs, self._file("cpu", "cpu.cfs_period_us"), str(period_us))
        if quota_us is not None:
            put(self._fs, self._file("cpu", "cpu.cfs_quota_us"), str(quota_us))

    def _write_cpu_weight(self, cores: float) -> None:
        # cpu.shares is 2..262144 (1024 = default): 1024 per core of quota.
        put(self._fs, self._file("cpu", "cpu.shares"), str(min(262144, max(2, round(1024 * cores)))))

    def _write_mem_limit(self, limit_bytes: int | None) -> None:
        mem = self._file("memory", "memory.limit_in_bytes")
        memsw = self._file("memory", "memory.memsw.limit_in_bytes")
        new = "-1" if limit_bytes is None else str(limit_bytes)
        if not self._fs.exists(memsw):  # kernel without swap accounting: see V1Throttle.warning
            put(self._fs, mem, new)
            return
        # The kernel insists memsw >= limit at every moment, so raise memsw first and lower it last.
        growing = limit_bytes is None or limit_bytes >= int(get(self._fs, mem))
        for path in (memsw, mem) if growing else (mem, memsw):
            put(self._fs, path, new)

    def _write_frozen(self, frozen: bool) -> None:
        put(self._fs, self._file("freezer", "freezer.state"), "FROZEN" if frozen else "THAWED")

    def _read_frozen(self) -> bool:
        return get(self._fs, self._file("freezer", "freezer.state")) == "FROZEN"  # FREEZING = not yet

    def _counter(self, name: str) -> int:
        path = self._file("memory", name)
        return int(get(self._fs, path)) if self._fs.exists(path) else 0

    def _read_stats(self) -> GroupStats:
        fs = self._fs
        cpu = parse_keyed(get(fs, self._file("cpu", "cpu.stat")))
        current = int(get(fs, self._file("memory", "memory.usage_in_bytes")))
        oom = parse_keyed(get(fs, self._file("memory", "memory.oom_control")))
        pids = sorted({pid for leaf in self.place.leaves for pid in read_pids(fs, leaf)})
        return GroupStats(
            cpu_usage_s=int(get(fs, self._file("cpuacct", "cpuacct.usage"))) / 1e9,
            nr_periods=cpu.get("nr_periods", 0),
            nr_throttled=cpu.get("nr_throttled", 0),
            throttled_s=cpu.get("throttled_time", 0) / 1e9,
            mem_current_mb=current / MIB,
            mem_peak_mb=self._peak(current, int(get(fs, self._file("memory", "memory.max_usage_in_bytes")))),
            mem_limit_hits=sum(self._counter(f) for f in ("memory.failcnt", "memory.memsw.failcnt")),
            oom_kills=oom.get("oom_kill"),  # oom_control gained the counter in 4.13
            frozen=self._read_frozen(),
            pids=tuple(pids),
        )

    def _read_oom_kills(self) -> int | None:
        return parse_keyed(get(self._fs, self._file("memory", "memory.oom_control"))).get("oom_kill")


class V1Throttle(_CgroupThrottle):
    """One dir per device under each of cpu, cpuacct, memory and freezer."""

    backend = "cgroup1"

    def __init__(self, root: str = DEFAULT_ROOT, prefix: str = "orchard", *, run_id: str | None = None,
                 host_cores: int | None = None, fs: CgroupFs | None = None) -> None:
        super().__init__(root, prefix, run_id, host_cores, fs)
        missing = [c for c, marker in V1_CONTROLLERS.items() if not self._fs.exists(join(root, c, marker))]
        if missing:
            raise OrchardError(f"cgroup v1 controller(s) {', '.join(missing)} not mounted under {root}")
        # Distros often co-mount cpu,cpuacct with cpu and cpuacct as symlinks: one hierarchy, one dir.
        self.mounts = {c: os.path.realpath(join(root, c)) for c in V1_CONTROLLERS}
        self.hierarchies = tuple(dict.fromkeys(self.mounts.values()))
        if not self._fs.exists(join(self.mounts["memory"], "memory.memsw.limit_in_bytes")):
            self.warning = ("memory.memsw.* is absent (kernel without swap accounting, e.g. swapaccount=0): "
                            "a device may page to host swap instead of hitting its memory cap")
        for hierarchy in self.hierarchies:
            probe_writable(self._fs, join(hierarchy, self.prefix))

    def _weight_dirs(self) -> list[str]:
        return [join(self.mounts["cpu"], self.prefix), join(self.mounts["cpu"], self.prefix, self.run_id)]

    def _write_top_weight(self, cgroup_dir: str) -> None:
        put(self._fs, join(cgroup_dir, "cpu.shares"), "262144")

    def _make(self, name: str) -> CgroupGroup:
        leaves: list[str] = []
        try:
            with tree_lock:
                for hierarchy in self.hierarchies:
                    leaves.append(make_group_dirs(self._fs, hierarchy, self.prefix, self.run_id, name))
        except BaseException:
            remove_trees(self._fs, leaves)
            for leaf, hierarchy in zip(leaves, self.hierarchies, strict=False):
                prune_empty(self._fs, os.path.dirname(leaf), hierarchy)
            raise
        dirs = {c: join(m, self.prefix, self.run_id, name) for c, m in self.mounts.items()}
        place = GroupPlace(self.root, self.prefix, self.run_id, name, tuple(leaves), self.hierarchies)
        return V1Group(place, self._fs, self.host_cores, dirs)

