"""What a campaign runner (testbed.runner) and a cluster node's launcher (testbed.node) both do for
their devices: start each in its cgroup (placed before it runs any Python) and record it for the
orphan sweep, drive the availability and CPU traces (freeze = offline, quota rewrites), turn cgroup
OOM counters into events and restart a crashed agent as systemd would on a board."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.board import BoardConfig
from runtime.startup import PYTHON_FLAGS
from server.events import EventName
from testbed.campaign import Campaign, Group
from testbed.cgroups import MAX_PERIOD_US, MIN_QUOTA_US
from testbed.orphans import RunLedger
from testbed.shaping import RunLinks
from testbed.throttle import DeviceGroup
from testbed.traces import TraceDriver, make_availability, make_cpu_trace

ROOT = Path(__file__).resolve().parents[1]
RESTART_BACKOFF_S = 2.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h
MIN_QUOTA_CORES = MIN_QUOTA_US / MAX_PERIOD_US


@dataclass
class Device:
    device_id: str
    group: Group
    board: BoardConfig
    board_quota_cores: float  # the board's compute on this host, in host cores
    base_quota_cores: float  # its cgroup quota: board_quota_cores / dilation; the CPU trace scales it
    mem_limit_mb: int
    cgroup: DeviceGroup
    proc: subprocess.Popen[bytes] | None = None
    online: bool = True
    oom_kills: int = 0
    restarts: int = 0
    died_at: float | None = None


class DeviceSupervisor:
    """The device half of a launcher; the subclass sets these up and writes events (`_event`)."""

    # A cluster node's launcher sets it: when the node dies, its devices die with it (a lost host).
    die_with_launcher = False
    c: Campaign
    run: Path
    devices: dict[str, Device]
    links: RunLinks
    ledger: RunLedger
    _broker_url: str

    def _event(self, **record: Any) -> None:
        raise NotImplementedError

    def _base(self) -> Path:
        raise NotImplementedError

    def _spawn(self, name: str, args: list[str], group: DeviceGroup | None = None) -> subprocess.Popen[bytes]:
        log = (self.run / "logs" / f"{name}.log").open("ab")
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        endpoint = self.links.endpoint(name)
        # Looked up before the fork: the child of a threaded parent must not take the loader's lock.
        prctl = ctypes.CDLL(None).prctl if self.die_with_launcher else None

        def join() -> None:
            if prctl is not None:
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            # In the child before exec: no instruction of the device runs unthrottled or unshaped.
            if group is not None:
                group.add_pid(os.getpid())
            if endpoint is not None:
                endpoint.enter()

        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=join)
        self.ledger.add_process(name, proc.pid)
        return proc

    def _start_device(self, d: Device) -> None:
        config = self.run / "configs" / f"{d.device_id}.toml"
        d.proc = self._spawn(d.device_id, [*PYTHON_FLAGS, "-m", "runtime", "--config", str(config),
                                           "--broker", self._broker_url], d.cgroup)

    def _trace_driver(self) -> TraceDriver:
        avail, cpu = {}, {}
        # The index in the whole fleet, so a device gets the same trace on whichever host runs it.
        index_of = {device_id: i for i, (device_id, _) in enumerate(self.c.devices())}
        for d in self.devices.values():
            i = index_of[d.device_id]
            # `device`/`index` pick this device's rows from a trace file that holds a whole fleet.
            avail[d.device_id] = make_availability(d.group.availability, seed=self.c.seed + i, base_dir=self._base(),
                                                   device=d.device_id, index=i)
            cpu[d.device_id] = make_cpu_trace(d.group.cpu, seed=self.c.seed + 1000 + i, base_dir=self._base(),
                                              device=d.device_id, index=i)
        return TraceDriver(avail, cpu, set_online=self._set_online, set_cpu_fraction=self._set_cpu_fraction)

    def _set_online(self, device_id: str, online: bool) -> None:
        d = self.devices[device_id]
        if online == d.online:
            return
        # Frozen, the agent sends nothing: keepalives stop and the broker fires its Last Will.
        (d.cgroup.thaw if online else d.cgroup.freeze)()
        d.online = online
        self._event(event=EventName.AVAILABILITY, device=device_id, online=online)

    def _set_cpu_fraction(self, device_id: str, fraction: float) -> None:
        d = self.devices[device_id]
        # Floored at the smallest quota a cgroup can hold (1 ms per 1 s period), not above it: a
        # 0.01-core floor lifted every dilated quota below it (N >= ~50 Pi 4s on a loaded host)
        # to 0.01 at the trace's first step, so the fleet got more CPU than dilation planned.
        cores = max(MIN_QUOTA_CORES, d.base_quota_cores * fraction)
        d.cgroup.set_cpu_quota(cores)
        self._event(event=EventName.CPU_QUOTA, device=device_id, cores=round(cores, 4), fraction=round(fraction, 4))

    def _set_link_fraction(self, device_id: str, fraction: float) -> None:
        up_mbit, down_mbit = self.links.set_fraction(device_id, fraction)
        self._event(event=EventName.LINK_RATE, device=device_id, up_mbit=round(up_mbit, 4),
                    down_mbit=round(down_mbit, 4), fraction=round(fraction, 4))

    def _watch_devices(self, now: float) -> None:
        for d in self.devices.values():
            ooms = d.cgroup.oom_kills() or 0  # not stats(): ~15 files, 0.18 ms a device a loop
            if ooms > d.oom_kills:
                self._event(event=EventName.OOM, device=d.device_id, oom_kills=ooms, mem_limit_mb=d.mem_limit_mb)
                d.oom_kills = ooms
            if d.proc is not None and d.proc.poll() is not None and d.online:
                if d.died_at is None:
                    d.died_at = now
                    self._event(event=EventName.DEVICE_EXIT, device=d.device_id, code=d.proc.returncode)
                elif now - d.died_at >= RESTART_BACKOFF_S * (1 + min(d.restarts, 5)):
                    d.restarts += 1
                    d.died_at = None
                    self._event(event=EventName.DEVICE_RESTART, device=d.device_id, restarts=d.restarts)
                    self._start_device(d)


def stop_process_groups(procs: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM every process group, SIGKILL those still alive after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
