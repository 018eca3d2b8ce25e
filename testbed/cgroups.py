"""File-level cgroup mechanics behind `testbed.throttle`: one cgroup per emulated device.

Layout (so a sweep of `<prefix>` finds everything a crashed run left behind):
  v2: `<root>/<prefix>/<run_id>/<device>`
  v1: the same path under each controller we use, `<root>/{cpu,cpuacct,memory,freezer}/...`
Everything goes through plain file I/O on cgroupfs via `CgroupFs`, the seam unit tests replace
with a fake tree. Facts and pitfalls: research/platform.md §3.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from os.path import dirname, join

from runtime.errors import ConfigError, OrchardError

DEFAULT_ROOT = "/sys/fs/cgroup"
CPU_PERIOD_US = 100_000  # kernel default, and what `docker --cpus` uses: the period of an unlimited group
MIN_QUOTA_US = 1_000  # the kernel rejects quotas below 1 ms (sched-bwc.rst)
# A group's quota is used in one burst per period. A task that starts after an idle spell gets the
# whole burst at once, so it runs ahead of its quota by about half a period: with the kernel's 100 ms
# period that made a Pi 5 (16 ms bursts, dilated) 20 % fast and a Pi 4 (6 ms bursts) about right. With
# the same burst for every device the lead is the same fraction of every task, and ratios hold.
CPU_BURST_US = 2_000
MIN_PERIOD_US, MAX_PERIOD_US = 10_000, 1_000_000  # below 10 ms throttling overhead grows; 1 s is the kernel's max
MIN_MEM_LIMIT_MB = 8  # below this not even an interpreter starts (an agent says hello in 16): a unit mistake
MIB = 1 << 20  # "MB" throughout means MiB, as board RAM sizes do
FREEZE_TIMEOUT_S = 5.0
KILL_TIMEOUT_S = 5.0
POLL_S = 0.005
# No dots: every cgroupfs interface file has one, so a device called "cpu.max" cannot collide.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class GroupStats:
    """One reading of a device group's own counters (cumulative since the group was created)."""

    cpu_usage_s: float  # CPU time the group received (v1 cpuacct.usage, v2 cpu.stat usage_usec)
    nr_periods: int  # CFS bandwidth periods in which the group had runnable tasks
    nr_throttled: int  # periods in which it used up its quota and was throttled
    throttled_s: float  # total time spent throttled
    mem_current_mb: float
    mem_peak_mb: float  # kernel high-water mark; the max of sampled values where it has none (v2 < 5.19)
    # Times usage ran into the cap: v2 memory.events "max"; v1 memory.failcnt + memory.memsw.failcnt
    # (with memsw == limit the memsw counter trips first). Some kernels leave v1 failcnt at 0 even
    # on OOM (6.18 here), so treat oom_kills as the authoritative "device OOM" signal.
    mem_limit_hits: int
    oom_kills: int | None  # OOM-killer kills inside the group; None = this kernel does not count them
    frozen: bool
    pids: tuple[int, ...]


@dataclass(frozen=True)
class GroupPlace:
    """Where a group lives; `leaves` holds one dir per distinct v1 hierarchy (one dir on v2)."""

    root: str
    prefix: str
    run_id: str
    name: str
    leaves: tuple[str, ...]
    hierarchy_roots: tuple[str, ...]  # parallel to leaves; pruning stops there


def host_cpu_cores() -> int:
    """Cores this process may run on (taskset/cpuset aware): what any quota has to be drawn from."""
    return len(os.sched_getaffinity(0))


def cpu_period_us(cpu_quota_cores: float | None) -> int:
    """The CFS period for a quota: one CPU_BURST_US burst per period, within the kernel's bounds."""
    if cpu_quota_cores is None or cpu_quota_cores <= 0:
        return CPU_PERIOD_US
    return min(MAX_PERIOD_US, max(MIN_PERIOD_US, round(CPU_BURST_US / cpu_quota_cores)))


def cpu_quota_us(cpu_quota_cores: float | None, host_cores: int, period_us: int | None = None) -> int | None:
    """Cores -> CFS quota per period (`cpu_period_us` unless given); None = unlimited. Rejects what
    no host could deliver."""
    if cpu_quota_cores is None:
        return None
    if (
        isinstance(cpu_quota_cores, bool)
        or not isinstance(cpu_quota_cores, int | float)
        or not math.isfinite(cpu_quota_cores)
        or cpu_quota_cores <= 0
    ):
        raise ConfigError(
            f"cpu_quota_cores={cpu_quota_cores!r} is not a positive number of cores (None = unlimited)"
        )
    if cpu_quota_cores > host_cores:
        raise ConfigError(
            f"cpu_quota_cores={cpu_quota_cores:g} exceeds the {host_cores} cores this host can run on: "
            "a quota cannot deliver more CPU than exists (use a bigger host or fewer/slower boards)"
        )
    return max(MIN_QUOTA_US, round(cpu_quota_cores * (period_us or cpu_period_us(cpu_quota_cores))))


def check_weight_cores(cores: float) -> float:
    """A CPU weight given in cores (the device's quota): a positive, finite number."""
    if isinstance(cores, bool) or not isinstance(cores, (int, float)) or not (math.isfinite(cores) and cores > 0):
        raise ConfigError(f"CPU weight {cores!r} cores must be a positive number")
    return float(cores)


def mem_limit_bytes(mem_limit_mb: int | None) -> int | None:
    if mem_limit_mb is None:
        return None
    if isinstance(mem_limit_mb, bool) or not isinstance(mem_limit_mb, int):
        raise ConfigError(f"mem_limit_mb={mem_limit_mb!r} must be a whole number of MiB (None = unlimited)")
    if mem_limit_mb < MIN_MEM_LIMIT_MB:
        raise ConfigError(
            f"mem_limit_mb={mem_limit_mb} is below the {MIN_MEM_LIMIT_MB} MiB floor "
            "(nothing useful runs there; was the value meant in GB?)"
        )
    return mem_limit_mb * MIB


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ConfigError(
            f"{kind} {value!r} is not usable as a cgroup name: 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def run_id_for(campaign_name: str, suffix: str) -> str:
    """A cgroup-safe run id from a campaign name (a sweep's variant names may hold '.' or be long):
    other characters become '-', and the name is cut so `<name>-<suffix>` fits the 64-char limit."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", campaign_name).lstrip("_-") or "run"
    return check_name("run id", f"{safe[: 63 - len(suffix)]}-{suffix}")


def default_run_id() -> str:
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


class CgroupFs:
    """Every touch of cgroupfs. The kernel adds side effects plain files lack (mkdir fills in the
    interface files, freezing completes asynchronously, rmdir works on a dir full of files); the
    unit tests' fake tree subclasses this to emulate them."""

    def read(self, path: str) -> str:
        with open(path, encoding="ascii") as f:
            return f.read()

    def write(self, path: str, value: str) -> None:
        # No O_CREAT: a missing file means a missing controller, which a fake tree must not hide.
        # One write() call: cgroupfs parses each write on its own.
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode("ascii"))
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def subdirs(self, path: str) -> list[str]:
        with os.scandir(path) as it:
            return sorted(join(path, e.name) for e in it if e.is_dir(follow_symlinks=False))

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def kill(self, pid: int, sig: int) -> None:
        os.kill(pid, sig)


def _fail(action: str, path: str, exc: OSError) -> OrchardError:
    hint = ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = " (cgroups are not writable here: run as root or give a delegated subtree as root=)"
    return OrchardError(f"cannot {action} {path}: {exc.strerror or exc}{hint}")


def put(fs: CgroupFs, path: str, value: str) -> None:
    try:
        fs.write(path, value)
    except OSError as exc:
        raise _fail(f"write {value!r} to", path, exc) from exc


def get(fs: CgroupFs, path: str) -> str:
    try:
        return fs.read(path).strip()
    except OSError as exc:
        raise _fail("read", path, exc) from exc


def parse_keyed(text: str) -> dict[str, int]:
    """Flat-keyed cgroup files ("key value" per line): cpu.stat, memory.events, cgroup.events..."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def read_pids(fs: CgroupFs, cgroup_dir: str) -> list[int]:
    try:
        text = fs.read(join(cgroup_dir, "cgroup.procs"))
    except FileNotFoundError:
        return []  # already removed
    except OSError as exc:
        raise _fail("read", join(cgroup_dir, "cgroup.procs"), exc) from exc
    return [int(tok) for tok in text.split()]


def ensure_dir(fs: CgroupFs, path: str) -> bool:
    """mkdir that tolerates the dir existing; True if this call created it."""
    try:
        fs.mkdir(path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise _fail("create cgroup", path, exc) from exc


def probe_writable(fs: CgroupFs, prefix_dir: str) -> None:
    """Raise OrchardError naming the path if we cannot create groups there. Leaves nothing behind."""
    if ensure_dir(fs, prefix_dir):
        with contextlib.suppress(OSError):  # someone else started using it meanwhile: fine
            fs.rmdir(prefix_dir)


def hierarchy_root(fs: CgroupFs, cgroup_dir: str) -> str:
    d = cgroup_dir
    while fs.exists(join(dirname(d), "cgroup.procs")) and dirname(d) != d:
        d = dirname(d)
    return d


def remove_trees(fs: CgroupFs, tops: Iterable[str], timeout_s: float = KILL_TIMEOUT_S) -> list[str]:
    """Thaw, kill and rmdir every cgroup in and below each of `tops` (v1: one per hierarchy).
    Idempotent; returns the dirs removed; raises OrchardError naming whatever survived."""
    dirs: list[str] = []
    for top in tops:
        stack = [top] if fs.exists(top) else []
        while stack:  # pre-order: parents first, so reversed() is a safe rmdir order
            d = stack.pop()
            dirs.append(d)
            stack.extend(fs.subdirs(d))
    if not dirs:
        return []
    # Thaw first: a v1-frozen task does not act on SIGKILL until thawed (verified on this host).
    for d in dirs:
        for fname, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
            if fs.exists(join(d, fname)):
                with contextlib.suppress(OSError):  # the kill loop reports whatever then survives
                    fs.write(join(d, fname), value)
    deadline = time.monotonic() + timeout_s
    while True:
        members = {pid: d for d in dirs for pid in read_pids(fs, d)}
        if not members:
            break
        if time.monotonic() > deadline:
            raise OrchardError(f"pids {sorted(members)} in {sorted(set(members.values()))} survived SIGKILL")
        for d in dirs:
            if fs.exists(join(d, "cgroup.kill")):  # v2, 5.14+: kills the subtree without pid races
                with contextlib.suppress(OSError):
                    fs.write(join(d, "cgroup.kill"), "1")
        for pid, d in members.items():
            if pid == os.getpid():  # never kill the harness; move it out instead
                put(fs, join(hierarchy_root(fs, d), "cgroup.procs"), str(pid))
                continue
            with contextlib.suppress(ProcessLookupError):
                fs.kill(pid, signal.SIGKILL)
        time.sleep(POLL_S)
    for d in reversed(dirs):
        while True:
            try:
                fs.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as exc:  # EBUSY while a killed task finishes exiting
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise _fail("remove cgroup", d, exc) from exc
                time.sleep(POLL_S)
    return dirs


def prune_empty(fs: CgroupFs, start: str, stop: str) -> None:
    """rmdir `start` and its ancestors while they are empty, never `stop` or above."""
    d = start
    while d.startswith(stop + os.sep):
        try:
            fs.rmdir(d)
        except OSError:
            return  # ENOTEMPTY/EBUSY: other groups still live there
        d = dirname(d)


def make_group_dirs(fs: CgroupFs, hierarchy: str, prefix: str, run_id: str, name: str,
                    prepare: Callable[[str], None] | None = None) -> str:
    """mkdir hierarchy/prefix/run_id/name; parents may already exist, the leaf must not.
    `prepare(dir)` runs on each level before its child is made (v2 enables controllers there)."""
    leaf = join(hierarchy, prefix, run_id, name)
    for _attempt in range(3):  # another process may prune an empty parent under our feet
        try:
            for parent in (hierarchy, join(hierarchy, prefix), join(hierarchy, prefix, run_id)):
                if parent != hierarchy:
                    with contextlib.suppress(FileExistsError):
                        fs.mkdir(parent)
                if prepare is not None:
                    prepare(parent)
            fs.mkdir(leaf)
            return leaf
        except FileNotFoundError:
            continue
        except FileExistsError as exc:
            raise OrchardError(
                f"cgroup {leaf} already exists (a device name used twice, or a crashed run with the same "
                f"run id: testbed.throttle.cleanup_all({prefix!r}) removes leftovers)"
            ) from exc
        except OSError as exc:
            raise _fail("create cgroup", leaf, exc) from exc
    raise OrchardError(f"cannot create cgroup {leaf}: its parent keeps disappearing")
