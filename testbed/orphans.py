"""What a campaign run leaves behind when its runner dies without cleaning up (SIGKILL, a killed
test, the host's OOM killer): its broker, server and device process groups, and their cgroups.

Every runner keeps a ledger, `<state dir>/run-<pid>-<id>.json` (so do `orchard mpsl run`,
`orchard broker --lab` and each cluster node's launcher, whose devices die with it but whose
cgroups do not): the runner's pid, start time and cmdline, and for each process group it starts
(broker, server, each device and every restart, compute nodes and data owners) the leader's pid,
start time and cmdline, plus the devices' cgroups and scratch dirs (a broker's, a node's work
folder). The runner removes its ledger once its own cleanup is done. `sweep_orphans()`, which
every run calls before it starts anything, reads the ledgers of runners that are gone and
stops what they left:

- a process is identified by pid + start time (clock ticks since boot) + cmdline, never by name:
  a pid that now belongs to another process is left alone;
- a group whose leader has exited is still the run's while any process is in it (Linux never
  hands out a pid that is still a process group's id), so its members are killed by group id;
- cgroups are thawed first (a v1-frozen task does not act on SIGKILL), emptied and removed.

The netns slots of such a run are swept by testbed.netns.sweep_stale, from the same start times.
One state dir for every run on the host, as for the netns slots; ORCHARD_RUNS_STATE moves it (a
hermetic test), and an unprivileged user, who cannot write /run, gets one under the temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from os.path import dirname
from pathlib import Path
from typing import Any

from runtime.errors import OrchardError
from testbed.cgroup_backends import CgroupGroup
from testbed.cgroups import CgroupFs, hierarchy_root, prune_empty, remove_trees

STATE_DIR = "/run/orchard-runs"
KILL_WAIT_S = 5.0


def state_dir() -> Path:
    """Where ledgers live: ORCHARD_RUNS_STATE, else /run/orchard-runs (root), else a per-user temp dir."""
    override = os.environ.get("ORCHARD_RUNS_STATE")
    if override:
        return Path(override)
    if os.access(dirname(STATE_DIR), os.W_OK):
        return Path(STATE_DIR)
    return Path(tempfile.gettempdir()) / f"orchard-runs-{os.getuid()}"


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces): field 3 onwards."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (stat field 22), None when it is gone."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def same_process(pid: object, start: object, cmdline: object = None) -> bool:
    """Is `pid` still the process recorded with this start time (and cmdline, when recorded)?"""
    if not isinstance(pid, int) or pid <= 0 or proc_start(pid) != str(start):
        return False
    return cmdline is None or proc_cmdline(pid) == cmdline


def _identity(pid: int) -> dict[str, Any]:
    return {"pid": pid, "start": proc_start(pid), "cmdline": proc_cmdline(pid)}


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
                members.append(int(entry))
    return members


class RunLedger:
    """One runner's record of what it started. Inert until open(); close() removes it."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.record: dict[str, Any] = {}

    def open(self, run: Path, *, owner_renames_itself: bool = False) -> RunLedger:
        """`owner_renames_itself`: the owner is known by pid + start time only, not its cmdline (a
        Ray worker retitles itself per task, so a live node launcher would look gone)."""
        folder = state_dir()
        folder.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.path = folder / f"run-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        owner = _identity(os.getpid())
        if owner_renames_itself:
            owner["cmdline"] = None
        self.record = {"owner": owner, "run": str(run), "procs": [], "cgroups": [], "paths": []}
        self._write()
        return self

    def add_process(self, name: str, pid: int | None, scratch_dir: Path | None = None) -> None:
        """Record a process group leader (Popen(start_new_session=True) has returned: exec is done),
        and the scratch dir it leaves if killed (`orchard-*` under the temp dir: a broker's)."""
        if self.path is None or pid is None:
            return
        self.record["procs"].append({"name": name, **_identity(pid)})
        if scratch_dir is not None:
            self.record["paths"].append(str(scratch_dir))
        self._write()

    def add_path(self, scratch_dir: Path) -> None:
        """A scratch folder the run removes itself (only `orchard-*` under the temp dir is swept)."""
        if self.path is not None:
            self.record["paths"].append(str(scratch_dir))
            self._write()

    def add_cgroup(self, group: object) -> None:
        if self.path is not None and isinstance(group, CgroupGroup):
            self.record["cgroups"].extend(group.place.leaves)
            self._write()

    def close(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def _write(self) -> None:
        assert self.path is not None
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record) + "\n")
        os.replace(tmp, self.path)  # a sweep never reads half a ledger


@dataclass
class Swept:
    """What one dead runner left and the sweep stopped."""

    runner_pid: int
    run: str
    processes: list[str] = field(default_factory=list)  # "<name> (pid N)" of each group stopped
    cgroups: int = 0

    def describe(self) -> str:
        return (f"stopped {len(self.processes)} process groups ({', '.join(self.processes) or 'none'}) and "
                f"removed {self.cgroups} cgroups left by runner pid {self.runner_pid} (run {self.run}), "
                "which was killed before it cleaned up")


def _still_ours(entry: dict[str, Any]) -> bool:
    """Does the group `entry` leads still hold a process of the run?"""
    pid = entry.get("pid")
    if not isinstance(pid, int) or pid <= 1:
        return False
    leader = _stat_fields(pid)
    if leader is not None and len(leader) > 19:
        if leader[19] != str(entry.get("start")):
            return False  # the pid is another process's now
        if leader[0] != "Z" and proc_cmdline(pid) != entry.get("cmdline"):
            return False  # same start tick, another program: not ours either
    return bool(_group_members(pid))


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)  # gone before the new run binds ports and asks for memory


def _remove_cgroups(leaves: list[str], fs: CgroupFs) -> int:
    leaves = [leaf for leaf in leaves if isinstance(leaf, str) and os.path.isabs(leaf) and fs.exists(leaf)]
    if not leaves:
        return 0
    tops = [hierarchy_root(fs, leaf) for leaf in leaves]
    removed = remove_trees(fs, leaves)
    for leaf, top in zip(leaves, tops, strict=True):
        prune_empty(fs, dirname(leaf), top)
    return len(removed)


def sweep_orphans(folder: Path | None = None) -> list[Swept]:
    """Stop the processes and remove the cgroups of every run whose runner is gone."""
    folder = folder or state_dir()
    swept: list[Swept] = []
    try:
        ledgers = sorted(folder.glob("run-*.json"))
    except OSError:
        return swept
    for path in ledgers:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now, or not ours to judge
        owner = record.get("owner", {}) if isinstance(record, dict) else {}
        if not isinstance(owner, dict) or same_process(owner.get("pid"), owner.get("start"), owner.get("cmdline")):
            continue  # its runner lives: it cleans up itself
        found = Swept(int(owner.get("pid") or 0), str(record.get("run", "?")))
        ours = [e for e in record.get("procs", []) if isinstance(e, dict) and _still_ours(e)]
        # Cgroups first: their members are thawed, then killed (a frozen device ignores SIGKILL).
        with contextlib.suppress(OSError, OrchardError):  # the group kills below still run
            found.cgroups = _remove_cgroups(list(record.get("cgroups", [])), CgroupFs())
        for entry in ours:
            if _still_ours(entry):  # not already gone with its cgroup
                _kill_group(entry["pid"])
            found.processes.append(f"{entry.get('name')} (pid {entry.get('pid')})")
        for extra in record.get("paths", []):
            if isinstance(extra, str) and Path(extra).parent == Path(tempfile.gettempdir()) and \
                    Path(extra).name.startswith("orchard-"):
                shutil.rmtree(extra, ignore_errors=True)
        path.unlink(missing_ok=True)
        if found.processes or found.cgroups:
            swept.append(found)
    return swept


def sweep_lines() -> list[str]:
    """The sweep a run does before it starts: one warning line per dead run it cleaned up."""
    return [f"warning: {found.describe()}" for found in sweep_orphans()]


def sweep_and_report() -> None:
    """sweep_lines(), printed to stderr."""
    for line in sweep_lines():
        print(line, file=sys.stderr, flush=True)
