"""One cluster node's share of a campaign: the single-host launcher, for some of the devices.

testbed.cluster places one `NodeLauncher` on each Ray node (as an actor; this module imports no
Ray, so it runs and tests as plain Python). It does there what testbed.runner does on one host,
for its devices only: cgroups, this host's own speed calibration and the dilation it would need,
availability and CPU traces, OOM and exit watching, restart. The head sends the files a device
reads (its config and shard, trace files) and the campaign-wide dilation; events go back through
`drain`, logs through `stop`. Devices are started with PR_SET_PDEATHSIG, so when the node dies
(the host is lost), they die with it and the broker fires their Last Will, as on a real board.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from runtime.board import load_board
from runtime.errors import OrchardError
from runtime.telemetry import threads_for_quota
from testbed.calibrate import board_quota_cores, get_host_speed
from testbed.campaign import Campaign
from testbed.cgroups import host_cpu_cores
from testbed.dilation import Dilation, background_cores, plan_dilation
from testbed.orphans import sweep_lines
from testbed.runner import LOOP_S, CampaignRunner
from testbed.supervisor import Device, stop_process_groups
from testbed.throttle import Throttle


class NodeLauncher(CampaignRunner):
    die_with_launcher = True

    def __init__(self, campaign: Campaign, device_ids: list[str], node_cores: int, *,
                 no_throttle: bool = False, work_root: str | None = None) -> None:
        work = Path(work_root or tempfile.gettempdir()) / f"orchard-node-{campaign.name}-{uuid.uuid4().hex[:6]}"
        super().__init__(campaign, work, no_throttle=no_throttle, quiet=True)
        self.share = list(device_ids)
        self.node_cores = max(1, int(node_cores))
        self.throttle: Throttle | None = None
        self.quotas: dict[str, float] = {}
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: str | None = None

    def _base(self) -> Path:
        # Trace files named relative to the campaign file arrive with launch() under campaign/.
        return self.run / "campaign"

    # ------------------------------------------------------------ before the run
    def calibrate(self) -> dict[str, Any]:
        """This host's speed, each device's quota and ORT threads, and the dilation this node needs.
        First, what killed launchers left on this host (`swept`: one line each, the head prints
        them): a launcher's devices die with it, its cgroups stay until a sweep removes them."""
        swept = sweep_lines()
        self.throttle = self._throttle()
        self.ledger.open(self.run, owner_renames_itself=True)
        if self.run.parent == Path(tempfile.gettempdir()):
            self.ledger.add_path(self.run)  # the devices' files, removed by stop()
        host = get_host_speed(pinned=self.c.host_speed)
        groups = dict(self.c.devices())
        threads = {}
        for d in self.share:
            board = load_board(groups[d].board)
            self.quotas[d] = board_quota_cores(board, host)
            threads[d] = threads_for_quota(self.quotas[d], board.cores)
        quotas = list(self.quotas.values())
        cores = self.node_cores  # what the node offers the cluster, not what its kernel has
        if self.throttle.backend == "none":
            dilation = plan_dilation("off", quotas, cores, self.c.reserve_cores)
        else:
            dilation = plan_dilation(self.c.dilation, quotas, cores, self.c.reserve_cores, background_cores(cores))
        return {"hostname": socket.gethostname(), "cores": cores, "throttle_backend": self.throttle.backend,
                "throttle_warning": self.throttle.warning, "host": host, "dilation": dilation,
                "quotas": dict(self.quotas), "threads": threads, "swept": swept}

    def launch(self, files: dict[str, bytes], dilation: Dilation, broker_url: str, start_unix: float) -> list[
            dict[str, Any]]:
        """Lay out the device files, make the cgroups and start the devices (in the loop thread)."""
        assert self.throttle is not None, "calibrate() first"
        for rel, blob in files.items():
            path = self.run / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if rel.startswith("secrets/"):  # credentials: owner-only, or the device refuses them
                path.parent.chmod(0o700)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                continue
            path.write_bytes(blob)
        for sub in ("logs", "cache"):
            (self.run / sub).mkdir(parents=True, exist_ok=True)
        self.dilation, self.start_unix, self._broker_url = dilation, start_unix, broker_url
        groups = dict(self.c.devices())
        for d in self.share:
            group = groups[d]
            board = load_board(group.board)
            mem = group.mem_limit_mb or board.memory_cap_mb
            quota = min(self.quotas[d] / dilation.factor, float(host_cpu_cores()))
            cgroup = self.throttle.create(d, quota, mem)
            self.ledger.add_cgroup(cgroup)
            cgroup.set_cpu_weight(quota)
            self.devices[d] = Device(d, group, board, self.quotas[d], quota, mem, cgroup)
        self.throttle.prioritise_cpu()
        self._thread = threading.Thread(target=self._run, name="orchard-node", daemon=True)
        self._thread.start()
        return [{"id": d.device_id, "cpu_quota_cores": round(d.base_quota_cores, 4),
                 "board_quota_cores": round(d.board_quota_cores, 4), "mem_limit_mb": d.mem_limit_mb}
                for d in self.devices.values()]

    # ------------------------------------------------------------ the run
    def _run(self) -> None:
        # Every device process is a child of this thread: PR_SET_PDEATHSIG follows the thread.
        try:
            driver = self._trace_driver()
            for d in self.devices.values():
                self._start_device(d)
            driver.step(0.0)
            while not self._halt.wait(LOOP_S):
                now = self._board_s(time.time())
                driver.step(now)
                self._watch_devices(now)
        except Exception:
            self._failure = traceback.format_exc(limit=4)
        finally:
            if self._halt.is_set() or self._failure is not None:
                self._stop_devices()

    def _event(self, **record: Any) -> None:
        record.setdefault("wall_t", round(time.time(), 3))
        record.setdefault("t", round(self._board_s(record["wall_t"]), 3))
        with self._lock:
            self._pending.append(record)

    def drain(self) -> list[dict[str, Any]]:
        """Events since the last call; raises if the node's loop failed."""
        if self._failure is not None:
            raise OrchardError(f"node launcher failed: {self._failure}")
        with self._lock:
            out, self._pending = self._pending, []
        return out

    def _stop_devices(self) -> None:
        for d in self.devices.values():
            with contextlib.suppress(OrchardError):
                d.cgroup.thaw()  # a frozen process cannot act on SIGTERM
        stop_process_groups([d.proc for d in self.devices.values() if d.proc is not None], grace_s=6.0)

    def stop(self) -> dict[str, Any]:
        """Stop the devices, remove the cgroups; returns the last events and every device's log."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(30)
        for d in self.devices.values():
            d.cgroup.destroy()
        if self.throttle is not None:
            self.throttle.close()
        logs = {p.name: p.read_bytes() for p in sorted((self.run / "logs").glob("*.log"))}
        with self._lock:
            events, self._pending = self._pending, []
        shutil.rmtree(self.run, ignore_errors=True)
        self.ledger.close()
        return {"events": events, "logs": logs}


def dilation_at(dilation: Dilation, factor: float) -> Dilation:
    """This node's plan, run at the campaign-wide factor (the largest any node needs)."""
    return dataclasses.replace(dilation, factor=factor)
