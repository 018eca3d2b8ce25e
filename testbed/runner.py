"""Run a campaign: a fleet of emulated boards, each device in its own cgroup, driven by traces.

Order of work: check everything that can be checked before any process starts (campaign,
throttling, bandwidth support); calibrate the host and plan the time dilation (testbed.dilation:
quotas / delta, every time constant x delta in wall time, all outputs in board seconds); lay out
the run folder; start broker, server and
devices (each device process is placed in its cgroup before it runs any Python, so its trainer
child inherits the limits); then loop: apply trace changes (freeze = offline, quota rewrites),
turn cgroup OOM counters into events, restart a crashed agent as systemd would on a board, and
apply the stop rule. Whatever happens (end, error, Ctrl-C) every process and cgroup is removed
and the report is written for what ran.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

from runtime.agent import REASSEMBLY_TIMEOUT_S
from runtime.board import load_board
from runtime.device_config import DEFAULT_POLL_S, DEFAULT_TRAINER_START_TIMEOUT_S
from runtime.errors import EXIT_TRANSPORT, ConfigError, OrchardError, TransportError
from runtime.telemetry import threads_for_quota
from server.events import EventName
from testbed.broker import Broker, open_broker
from testbed.bytecode import compile_runtime
from testbed.calibrate import HostSpeed, board_quota_cores, get_host_speed
from testbed.campaign import Campaign
from testbed.cgroups import DEFAULT_ROOT, host_cpu_cores, run_id_for
from testbed.dilation import Dilation, background_cores, plan_dilation
from testbed.lab_secrets import load_lab
from testbed.live import LiveView
from testbed.orphans import RunLedger, sweep_and_report
from testbed.prepare import DataPlan, DevicePlan, fresh_run_dir, prepare_run
from testbed.shaping import RunLinks, check_links
from testbed.supervisor import Device, DeviceSupervisor, stop_process_groups
from testbed.throttle import DeviceGroup, NullThrottle, Throttle, detect_throttle
from testbed.traces import make_availability

LOOP_S = 0.25  # board seconds between the runner's looks at traces, devices and stop rules ...
LOOP_MAX_WALL_S = 1.0  # ... but at least once a wall second (a stopped server is noticed soon)
# Board seconds past [stop] duration_board_s until the runner stops a server that did not stop itself.
STOP_GRACE_S = 30.0
# The broker and server run in a group of their own next to the devices, weighted as the reserve
# dilation leaves them (at least this much, for reserve_cores = 0): see Throttle.create_harness.
MIN_HARNESS_WEIGHT_CORES = 0.1
GIVE_UP_EXITS = 4  # exits of every device, none of which ever said hello, that end a campaign


def server_tables(c: Campaign, min_devices: int) -> dict[str, dict[str, Any]]:
    """The server TOML's [rounds], [strategy], [method] and [train] tables for a campaign (a run
    folder's, or a lab's: testbed/lab.py)."""
    rounds: dict[str, Any] = {"strategy": c.strategy, "time_limit_s": c.duration_board_s,
                              "min_devices": min_devices, "task_timeout_s": max(60.0, c.duration_board_s / 4)}
    if c.rounds is not None:
        rounds["target_version"] = c.rounds
    if c.target_accuracy is not None:
        rounds["target_accuracy"] = c.target_accuracy
    method = {"method": {"name": c.method, **c.method_params}} if c.method else {}
    return {"rounds": rounds, "strategy": dict(c.strategy_params), **method,
            "train": {"local_steps": c.local_steps, "local_epochs": c.local_epochs, "lr": c.lr,
                      "batch_size": c.batch_size, "upload": c.upload, "encoding": c.encoding}}


class CampaignRunner(DeviceSupervisor):
    def __init__(self, campaign: Campaign, out: Path, *, force: bool = False, no_throttle: bool = False,
                 quiet: bool = False, broker: str | None = None) -> None:
        self.c = campaign
        self.run = out
        self.force = force
        self.no_throttle = no_throttle
        self.quiet = quiet
        self.broker_spec = broker or campaign.broker
        self.devices: dict[str, Device] = {}
        self.server: subprocess.Popen[bytes] | None = None
        self.harness: DeviceGroup | None = None  # the broker's and server's cgroup
        self._events: TextIO | None = None
        self._broker_url = ""
        self.stop_reason: str | None = None
        self.summary: dict[str, Any] = {}
        self.server_error: str | None = None  # the server's one-line error, if it exited non-zero
        self.dilation: Dilation | None = None
        self.start_unix = time.time()  # reset when the server starts: the origin of every output time
        self.links = RunLinks({}, 1.0)
        self.ledger = RunLedger()  # what this run starts, so the next run can stop it if this one is SIGKILLed

    # ------------------------------------------------------------ checks before anything starts
    def _throttle(self) -> Throttle:
        run_id = run_id_for(self.c.name, uuid.uuid4().hex[:6])
        if self.no_throttle or self.c.throttle_backend == "none":
            why = "--no-throttle" if self.no_throttle else "[throttle] backend = \"none\""
            return NullThrottle(f"THROTTLING DISABLED ({why}): devices run with the host's full CPU and memory, "
                                "so timings, memory caps and OOMs do NOT reflect the boards", run_id)
        try:
            # ORCHARD_CGROUP_ROOT lets a test (or an unusual host) point at another hierarchy.
            root = os.environ.get("ORCHARD_CGROUP_ROOT", DEFAULT_ROOT)
            throttle = detect_throttle(root, run_id=run_id, required=self.c.throttle_require)
        except OrchardError as exc:
            raise ConfigError(f"campaign {self.c.name!r} needs cgroups: {exc}; run with --no-throttle to "
                              "run unthrottled") from None
        wanted = self.c.throttle_backend
        if wanted != "auto" and throttle.backend != wanted:
            throttle.close()
            raise ConfigError(f"campaign asks for throttle backend {wanted!r}, this host offers "
                              f"{throttle.backend!r}; set [throttle] backend = \"auto\" or use --no-throttle")
        return throttle

    def _check_links(self) -> None:
        support = check_links({d: g.link for d, g in self.c.devices() if g.link is not None}, self.broker_spec)
        if support is not None:
            print(support.describe(), flush=True)

    # ------------------------------------------------------------ the run
    def execute(self) -> dict[str, Any]:
        """Run the campaign; returns summary.json's content. Raises on errors after cleaning up
        (and after writing the report, if the run got far enough to have one)."""
        sweep_and_report()  # what SIGKILLed runs left: their processes would skew this run's CPU
        self._check_links()
        throttle = self._throttle()
        self.ledger.open(self.run)
        started = time.monotonic()
        prepared = launched = False
        stack = contextlib.ExitStack()
        try:
            host = get_host_speed(pinned=self.c.host_speed)
            boards = {g.board: load_board(g.board) for g in self.c.fleet}
            quotas = {d: board_quota_cores(boards[g.board], host) for d, g in self.c.devices()}
            # Threads follow the board's quota, not the dilated one: a board's parallelism is its own.
            plans = [DevicePlan(d, g.board, g.profiles, g.name, threads_for_quota(quotas[d], boards[g.board].cores))
                     for d, g in self.c.devices()]
            dilation = self.dilation = self._plan_dilation(throttle, list(quotas.values()))
            print(dilation.describe(), flush=True)
            if (warning := dilation.warning()) and throttle.backend != "none":
                print(f"warning: {warning}", file=sys.stderr, flush=True)
            fresh_run_dir(self.run, self.force)
            prepared = True
            if self.c.source is not None:
                shutil.copyfile(self.c.source, self.run / "config.toml")  # not copy: its mode is the umask's, 0640
            data = DataPlan(self.c.model, self.c.dataset, self.c.data_root, self.c.partition, self.c.eval_fraction,
                            self.c.seed, self.c.samples, self.c.input_shape)
            # Time constants a device applies itself are given to it in wall time.
            prepare_run(self.run, data, plans, self._server_tables(plans),
                        keepalive_s=math.ceil(dilation.wall_s(self.c.keepalive_s)), offline=self.c.offline,
                        telemetry_hz=1.0 / dilation.factor,
                        poll_s=dilation.wall_s(DEFAULT_POLL_S),
                        trainer_start_timeout_s=dilation.wall_s(DEFAULT_TRAINER_START_TIMEOUT_S),
                        tls=self.broker_spec == "mosquitto",
                        client_certs=self.c.client_certs and self.broker_spec == "mosquitto")
            for (device_id, group), plan in zip(self.c.devices(), plans, strict=True):
                board = boards[plan.board]
                mem = group.mem_limit_mb or board.memory_cap_mb
                # A board with more compute than the host (or dilation "off") gets at most every core.
                cgroup_quota = min(quotas[device_id] / dilation.factor, float(host_cpu_cores()))
                cgroup = throttle.create(device_id, cgroup_quota, mem)
                self.ledger.add_cgroup(cgroup)
                cgroup.set_cpu_weight(cgroup_quota)
                self.devices[device_id] = Device(device_id, group, board, quotas[device_id], cgroup_quota, mem, cgroup)
            throttle.prioritise_cpu()
            self.harness = throttle.create_harness(max(self.c.reserve_cores, MIN_HARNESS_WEIGHT_CORES))
            if self.harness is not None:  # destroyed once the broker is gone (the stack unwinds in reverse)
                self.ledger.add_cgroup(self.harness)
                stack.callback(self.harness.destroy)
            # Closed after the broker (the stack unwinds in reverse), once every process is gone.
            self.links = RunLinks({d: g.link for d, g in self.c.devices() if g.link is not None}, dilation.factor)
            stack.callback(self.links.close)
            self.links.open()
            for line in self.links.slow_link_warnings((self.run / "init.npy").stat().st_size, REASSEMBLY_TIMEOUT_S):
                print(f"warning: {line}", file=sys.stderr, flush=True)
            self._write_fleet(throttle, host, dilation, {p.device_id: p.threads for p in plans})
            launched = True
            self._loop(self._open_broker(stack).url, started)
        except KeyboardInterrupt:
            self.stop_reason = "interrupted (Ctrl-C)"
        except BaseException as exc:
            self.stop_reason = f"error: {exc}"
            raise
        finally:
            # Processes first, the broker last: the server and devices say goodbye through it.
            self._shutdown(throttle)
            self._finish(stack, prepared, launched)
        if self.server_error is not None:  # e.g. its broker unreachable: the campaign failed, say so
            raise (TransportError if self.server_error.startswith(f"code {EXIT_TRANSPORT}") else OrchardError)(
                f"the server exited with {self.server_error}")
        return self.summary

    def _open_broker(self, stack: contextlib.ExitStack) -> Broker:
        """Start the run's broker (closed with `stack`, after every process), recorded for the sweep."""
        broker = stack.enter_context(open_broker(self.broker_spec, host=self.links.broker_host,
                                                 lab=load_lab(self.run)))
        self.ledger.add_process("broker", broker.pid, broker.scratch_dir)
        if self.harness is not None and broker.pid is not None:  # None: a broker not ours to place
            self.harness.add_pid(broker.pid)
        return broker

    def _finish(self, stack: contextlib.ExitStack, prepared: bool, launched: bool) -> None:
        """Once the processes are stopped: the broker and links go, then the ledger (a failed cleanup
        keeps it, for the next run's sweep); then the folder is removed or reported."""
        stack.close()
        self.ledger.close()
        if prepared and not launched:  # a check failed while laying out: leave no half-built folder
            shutil.rmtree(self.run, ignore_errors=True)
        elif prepared and (self.run / "events.jsonl").exists():
            self.summary = self._report()

    def _plan_dilation(self, throttle: Throttle, quotas: list[float]) -> Dilation:
        cores = os.cpu_count() or 1
        if throttle.backend == "none":  # nothing is held to a quota, so slowing down would change nothing
            return plan_dilation("off", quotas, cores, self.c.reserve_cores)
        return plan_dilation(self.c.dilation, quotas, cores, self.c.reserve_cores, background_cores(cores))

    def _server_tables(self, plans: list[DevicePlan]) -> dict[str, dict[str, Any]]:
        c = self.c
        initially_online = sum(
            make_availability(g.availability, seed=c.seed + i, base_dir=self._base(), device=d, index=i).online_at(0.0)
            for i, (d, g) in enumerate(c.devices()))
        return server_tables(c, c.min_devices if c.min_devices is not None else max(1, initially_online))

    def _base(self) -> Path:
        return self.c.source.parent if self.c.source is not None else Path.cwd()

    def _write_fleet(self, throttle: Throttle, host: HostSpeed, dilation: Dilation, threads: dict[str, int]) -> None:
        fleet = {
            "campaign": self.c.name, "strategy": self.c.strategy, "throttle_backend": throttle.backend,
            "throttle_warning": throttle.warning, "host_speed_factor": round(host.speed_factor, 4),
            "host_speed_source": host.source, "host_speed": dataclasses.asdict(host),
            "time_dilation": dilation.factor, "dilation": {**dilation.as_dict(), "text": dilation.describe()},
            "dilation_warning": dilation.warning() if throttle.backend != "none" else None,
            "devices": [{"id": d.device_id, "board": d.board.name, "group": d.group.name,
                         "profile": d.group.profiles[0], "profiles": list(d.group.profiles),
                         "board_quota_cores": round(d.board_quota_cores, 4),
                         "cpu_quota_cores": round(d.base_quota_cores, 4), "threads": threads[d.device_id],
                         "mem_limit_mb": d.mem_limit_mb, "speed_factor": d.board.speed_factor,
                         "link": self.links.describe(d.device_id)}
                        for d in self.devices.values()],
        }
        (self.run / "fleet.json").write_text(json.dumps(fleet, indent=1) + "\n")

    def _event(self, **record: Any) -> None:
        if self._events is None:
            return
        record.setdefault("wall_t", round(time.time(), 3))
        record.setdefault("t", round(self._board_s(record["wall_t"]), 3))
        self._events.write(json.dumps(record) + "\n")
        self._events.flush()

    def _board_s(self, unix_s: float) -> float:
        return (unix_s - self.start_unix) / (self.dilation.factor if self.dilation else 1.0)

    def _start_clock(self) -> None:
        """Campaign start = now; the server counts every time from it, in board seconds."""
        self.start_unix = time.time()
        factor = self.dilation.factor if self.dilation else 1.0
        with (self.run / "configs" / "server.toml").open("a") as f:
            f.write(f"\n[clock]\nstart_unix = {self.start_unix!r}\ndilation = {factor!r}\n")

    def _loop(self, broker_url: str, started: float) -> None:
        self._broker_url = broker_url
        self._start_clock()
        self.server = self._spawn("server", ["-m", "server", "--config", str(self.run / "configs" / "server.toml"),
                                             "--out", str(self.run), "--broker", broker_url], self.harness)
        events_path = self.run / "events.jsonl"
        while not events_path.exists():  # the server truncates it at start; append only after that
            if self.server.poll() is not None:
                raise OrchardError(f"server exited at start (code {self.server.returncode}): "
                                   f"{self._last_error('server')}")
            time.sleep(0.05)
        compile_runtime()  # as a board's install.sh does (testbed/bytecode.py)
        self._events = events_path.open("a")
        self._event(event=EventName.CAMPAIGN_START, campaign=self.c.name, devices=len(self.devices))
        driver = self._trace_driver()
        index_of = {d: i for i, d in enumerate(self.devices)}
        link_driver = self.links.trace_driver(self._base(), self.c.seed, index_of, self._set_link_fraction)
        for d in self.devices.values():
            self._start_device(d)
        driver.step(0.0)
        link_driver.step(0.0)
        live = LiveView(self.run, self.c, list(self.devices), lines_only=self.quiet)
        # On board time like everything it drives: under dilation a wall-clock 0.25 s made the
        # runner look 4 x delta times per board second at every device (1.3 % of the host at N=32).
        loop_s = min(LOOP_MAX_WALL_S, LOOP_S * (self.dilation.factor if self.dilation else 1.0))
        while self.stop_reason is None:
            time.sleep(loop_s)
            now = self._board_s(time.time())  # traces, the stop rule and the live view run on board time
            driver.step(now)
            link_driver.step(now)
            self._watch_devices(now)
            # The server stops itself at the target (the model it leaves is the one that got there);
            # the target is checked first so its exit reads as that, not as "server finished".
            if self.c.target_accuracy is not None and _best_accuracy(self.run) >= self.c.target_accuracy:
                self.stop_reason = f"target accuracy {self.c.target_accuracy} reached"
            elif self.server.poll() is not None:
                self.stop_reason = f"server finished (exit {self.server.returncode})"
                if self.server.returncode != 0:
                    self.server_error = f"code {self.server.returncode}: {self._last_error('server')}"
            elif now > self.c.duration_board_s + STOP_GRACE_S:
                self.stop_reason = f"time limit {self.c.duration_board_s:.0f} board s reached"
            elif self._all_gave_up():
                self.stop_reason = (f"every device exited {GIVE_UP_EXITS} times without ever saying hello; "
                                    "nothing can run")
            live.render(now)
        live.close()

    def _last_error(self, name: str) -> str:
        """The last `error: ...` line of a process's log (what its CLI printed), cut to one line."""
        try:
            lines = (self.run / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return f"see {self.run}/logs/{name}.log"
        errors = [ln for ln in lines if ln.startswith("error: ")]
        return errors[-1][7:307] if errors else f"see {self.run}/logs/{name}.log"

    def _all_gave_up(self) -> bool:
        # Waiting for duration_board_s would change nothing: every agent keeps dying before its hello.
        if not all(d.restarts + (d.died_at is not None) >= GIVE_UP_EXITS for d in self.devices.values()):
            return False
        try:
            return f'"{EventName.DEVICE_HELLO}"' not in (self.run / "events.jsonl").read_text(errors="replace")
        except OSError:
            return False

    def _shutdown(self, throttle: Throttle) -> None:
        for d in self.devices.values():
            with contextlib.suppress(OrchardError):
                d.cgroup.thaw()  # a frozen process cannot act on SIGTERM
        # Tasks still out from here on are unfinished, not wasted (see server.waste).
        self._event(event=EventName.CAMPAIGN_STOPPING, reason=self.stop_reason or "error")
        # Devices first, the server last: it records their final telemetry rows (which cover the
        # run to its end, offline spells included) and their goodbyes.
        stop_process_groups([d.proc for d in self.devices.values() if d.proc is not None], grace_s=6.0)
        stop_process_groups([self.server] if self.server is not None else [], grace_s=4.0)
        for d in self.devices.values():
            d.cgroup.destroy()
        throttle.close()
        self.links.write_bytes(self.run / "fleet.json")
        self._event(event=EventName.CAMPAIGN_STOP, reason=self.stop_reason or "error")
        if self._events is not None:
            self._events.close()
            self._events = None

    def failure(self) -> str | None:
        """One line saying why the run made no aggregation (see testbed.report.failure_line)."""
        from testbed.report import failure_line

        return failure_line({**self.summary, "campaign": self.c.name, "stop_reason": self.stop_reason})

    def _report(self) -> dict[str, Any]:
        from testbed.report import write_report

        summary: dict[str, Any] = write_report(self.run)
        summary.setdefault("stop_reason", self.stop_reason)
        return summary


def _best_accuracy(run: Path) -> float:
    try:
        with (run / "server.csv").open() as f:
            values = [float(r["accuracy"]) for r in csv.DictReader(f) if r.get("accuracy")]
    except (OSError, ValueError, KeyError):
        return 0.0
    return max(values, default=0.0)
