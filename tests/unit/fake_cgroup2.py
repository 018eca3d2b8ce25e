"""A fake cgroup v2 filesystem in a tmp dir, for `testbed.cgroups.CgroupFs` users' unit tests.

The tree is laid out like the kernel's (real file names and formats; interface files appear only
for controllers the parent enabled in cgroup.subtree_control) and the kernel's side effects are
emulated: rejecting bad values, "no internal processes", asynchronous freezing, cgroup.kill,
EBUSY on rmdir of a populated group. `kill` only pretends: no real process is ever signalled.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from testbed.cgroups import CgroupFs

ROOT_CONTROLLERS = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc")
READ_ONLY = {"cgroup.controllers", "cgroup.events", "cgroup.stat", "cpu.stat", "memory.current",
             "memory.events", "memory.peak", "memory.stat", "memory.swap.current"}


def _err(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


class FakeCgroup2(CgroupFs):
    def __init__(self, root: Path, controllers: tuple[str, ...] = ROOT_CONTROLLERS, *, memory_peak: bool = True,
                 swap: bool = True, cgroup_kill: bool = True, freeze_lag_reads: int = 2,
                 freeze_never_completes: bool = False) -> None:
        self.root = root
        self.memory_peak, self.swap, self.cgroup_kill = memory_peak, swap, cgroup_kill
        self.freeze_lag_reads = freeze_lag_reads
        self.freeze_never_completes = freeze_never_completes
        self.log: list[tuple[str, str, str]] = []  # (op, path relative to root, value)
        self.signalled: list[int] = []
        self.deny_mkdir = False
        self._lag: dict[str, int] = {}
        root.mkdir()
        self._files(root, {"cgroup.controllers": " ".join(controllers), "cgroup.subtree_control": "",
                           "cgroup.procs": "1\n", "cgroup.threads": "1\n", "cgroup.stat": "nr_descendants 0\n",
                           "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n", "memory.stat": ""})

    # -- helpers for tests
    @staticmethod
    def _files(d: Path, files: dict[str, str]) -> None:
        for name, text in files.items():
            (d / name).write_text(text)

    def rel(self, path: str | Path) -> str:
        return os.path.relpath(path, self.root)

    def text(self, rel: str) -> str:
        return (self.root / rel).read_text()

    def set_counters(self, rel: str, **values: int) -> None:
        (self.root / rel).write_text("".join(f"{k} {v}\n" for k, v in values.items()))

    def procs(self, d: Path) -> list[int]:
        return [int(t) for t in (d / "cgroup.procs").read_text().split()]

    def _set_procs(self, d: Path, pids: list[int]) -> None:
        (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
        if d != self.root:
            events = (d / "cgroup.events").read_text().replace("populated 0", "populated 1")
            (d / "cgroup.events").write_text(events if pids else events.replace("populated 1", "populated 0"))

    def _cgroups(self) -> list[Path]:
        return [Path(p) for p, _dirs, files in os.walk(self.root) if "cgroup.procs" in files]

    # -- kernel behaviour
    def mkdir(self, path: str) -> None:
        if self.deny_mkdir:
            raise _err(errno.EACCES, path)
        d = Path(path)
        os.mkdir(d)  # FileExistsError / FileNotFoundError like the kernel
        self.log.append(("mkdir", self.rel(d), ""))
        enabled = (d.parent / "cgroup.subtree_control").read_text().split()
        files = {"cgroup.procs": "", "cgroup.threads": "", "cgroup.controllers": " ".join(enabled),
                 "cgroup.subtree_control": "", "cgroup.events": "populated 0\nfrozen 0\n", "cgroup.freeze": "0",
                 "cgroup.type": "domain", "cgroup.stat": "nr_descendants 0\n", "memory.stat": "",
                 "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"}
        if self.cgroup_kill:
            files["cgroup.kill"] = ""
        if "cpu" in enabled:
            files.update({"cpu.max": "max 100000", "cpu.max.burst": "0", "cpu.weight": "100"})
            files["cpu.stat"] += "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\nnr_bursts 0\nburst_usec 0\n"
        if "memory" in enabled:
            files.update({"memory.current": "0", "memory.max": "max", "memory.high": "max", "memory.low": "0",
                          "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"})
            if self.memory_peak:
                files["memory.peak"] = "0"
            if self.swap:
                files.update({"memory.swap.max": "max", "memory.swap.current": "0"})
        self._files(d, files)

    def rmdir(self, path: str) -> None:
        d = Path(path)
        if not d.exists():
            raise _err(errno.ENOENT, path)
        if any(c.is_dir() for c in d.iterdir()) or self.procs(d):
            raise _err(errno.EBUSY, path)
        self.log.append(("rmdir", self.rel(d), ""))
        shutil.rmtree(d)  # the kernel removes the interface files along with the dir

    def kill(self, pid: int, sig: int) -> None:
        for d in self._cgroups():
            if pid in self.procs(d):
                self.log.append(("kill", self.rel(d), str(pid)))
                self.signalled.append(pid)
                self._set_procs(d, [p for p in self.procs(d) if p != pid])  # the process dies
                return
        raise ProcessLookupError(errno.ESRCH, "No such process")

    def read(self, path: str) -> str:
        p = Path(path)
        if p.name == "cgroup.events" and self.rel(p.parent) in self._lag:
            key = self.rel(p.parent)
            self._lag[key] -= 1
            if self._lag[key] <= 0 and not self.freeze_never_completes:
                del self._lag[key]
                frozen = (p.parent / "cgroup.freeze").read_text().strip()
                p.write_text(p.read_text().replace(f"frozen {1 - int(frozen)}", f"frozen {frozen}"))
        return super().read(path)

    def write(self, path: str, value: str) -> None:
        p, d = Path(path), Path(path).parent
        if not p.exists():
            raise _err(errno.ENOENT, path)  # cgroupfs cannot create files
        if p.name in READ_ONLY:
            raise _err(errno.EACCES, path)
        self.log.append(("write", self.rel(p), value))
        v = value.strip()
        if p.name == "cgroup.subtree_control":
            enabled = set(p.read_text().split())
            for tok in v.split():
                if tok[0] not in "+-" or tok[1:] not in (d / "cgroup.controllers").read_text().split():
                    raise _err(errno.ENOENT, path)
                if d != self.root and self.procs(d):
                    raise _err(errno.EBUSY, path)  # no internal processes
                (enabled.add if tok[0] == "+" else enabled.discard)(tok[1:])
            v = " ".join(c for c in ROOT_CONTROLLERS if c in enabled)
        elif p.name == "cgroup.procs":
            pid = int(v)
            if d != self.root and (d / "cgroup.subtree_control").read_text().split():
                raise _err(errno.EBUSY, path)  # no internal processes
            for other in self._cgroups():
                self._set_procs(other, [q for q in self.procs(other) if q != pid])
            self._set_procs(d, [*self.procs(d), pid])
            return
        elif p.name == "cgroup.freeze":
            if v not in ("0", "1"):
                raise _err(errno.EINVAL, path)
            self._lag[self.rel(d)] = self.freeze_lag_reads
        elif p.name == "cgroup.kill":
            if v != "1":
                raise _err(errno.EINVAL, path)
            for sub in [Path(x) for x, _d, f in os.walk(d) if "cgroup.procs" in f]:
                self.signalled.extend(self.procs(sub))
                self._set_procs(sub, [])
            return
        elif p.name == "cpu.max":
            parts = v.split()
            quota, period = parts[0], int(parts[1]) if len(parts) > 1 else 100000
            if not (1000 <= period <= 1_000_000) or (quota != "max" and int(quota) < 1000):
                raise _err(errno.EINVAL, path)
            v = f"{quota} {period}"
        elif p.name in ("memory.max", "memory.high", "memory.swap.max"):
            if v != "max" and (not v.isdigit()):
                raise _err(errno.EINVAL, path)
            v = v if v == "max" else str(int(v) // 4096 * 4096)  # the kernel rounds to pages
        super().write(path, v)
