"""A local federation: a broker, the server and N device processes on this host, unthrottled.

`prepare()` maps a `FederationSpec` (N devices, profiles and boards cycled over them) onto the
run-folder layout of `testbed/prepare.py`; `Federation` starts and stops the processes, so tests
and benchmarks can kill and restart any of them; `run_federation` is `orchard federate`.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError, OrchardError
from runtime.startup import PYTHON_FLAGS
from server.config import canonical_profile, method_table
from testbed.broker import Broker, open_broker
from testbed.bytecode import compile_runtime
from testbed.lab_secrets import load_lab
from testbed.orphans import RunLedger, sweep_and_report
from testbed.prepare import DataPlan, DevicePlan, fresh_run_dir, prepare_run, write_toml
from testbed.supervisor import stop_process_groups

__all__ = ["Federation", "FederationSpec", "prepare", "run_federation", "server_rows", "write_toml"]

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class FederationSpec:
    out: Path
    devices: int = 4
    strategy: str = "semi-async"
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    rounds: int = 10
    model: str = "lenet"
    dataset: str = "digits"
    data_root: str | None = None
    partition: str = "iid"
    profiles: tuple[str, ...] = ("dense",)  # cycled over the devices
    # Listed in every device's hello after its own profile, with artifacts built, so the server
    # can move a device down to one of them (e.g. after an out-of-memory kill).
    fallback_profiles: tuple[str, ...] = ()
    boards: tuple[str, ...] = ("rpi4b-4gb",)  # cycled over the devices
    local_steps: int = 20
    lr: float = 0.1
    batch_size: int = 32
    seed: int = 0
    broker: str = "amqtt"
    time_limit_s: float = 600.0
    task_timeout_s: float = 120.0
    eval_fraction: float = 0.2
    keepalive_s: int = 5
    method: str | None = None  # None: per profile, the first method that accepts it
    method_params: Mapping[str, Any] = field(default_factory=dict)  # [method] keys, checked by its spec

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ConfigError(f"--devices {self.devices}: need at least one device")
        if self.rounds < 1:
            raise ConfigError(f"--rounds {self.rounds}: need at least one round")

    def device_ids(self) -> list[str]:
        return [f"dev{i}" for i in range(self.devices)]


def prepare(spec: FederationSpec, force: bool = False) -> Path:
    """Write the run folder; returns it. Refuses an existing folder unless `force`."""
    run = spec.out
    fresh_run_dir(run, force)
    ids = spec.device_ids()
    method, params = method_table("--method", {"name": spec.method, **spec.method_params} if spec.method else None)
    canonical = canonical_profile("--profiles", method, params)
    fallbacks = tuple(canonical(p) for p in spec.fallback_profiles)
    plans = []
    for i, device_id in enumerate(ids):
        own = canonical(spec.profiles[i % len(spec.profiles)])
        plans.append(DevicePlan(device_id, spec.boards[i % len(spec.boards)], tuple(dict.fromkeys((own, *fallbacks)))))
    data = DataPlan(spec.model, spec.dataset, spec.data_root, spec.partition, spec.eval_fraction, spec.seed)
    server = {
        "rounds": {"strategy": spec.strategy, "target_version": spec.rounds, "time_limit_s": spec.time_limit_s,
                   "min_devices": spec.devices, "task_timeout_s": spec.task_timeout_s},
        "strategy": dict(spec.strategy_params),
        "train": {"local_steps": spec.local_steps, "lr": spec.lr, "batch_size": spec.batch_size},
        **({"method": {"name": method, **params}} if method else {}),
    }
    prepare_run(run, data, plans, server, keepalive_s=spec.keepalive_s, tls=spec.broker == "mosquitto")
    (run / "federation.json").write_text(json.dumps({**spec.__dict__, "out": str(spec.out)}, indent=1,
                                                    default=list))
    return run


class Federation:
    """The processes of one run: server and devices, each in its own session (process group)."""

    def __init__(self, run: Path, broker_url: str) -> None:
        self.run = run
        self.broker_url = broker_url
        self.server: subprocess.Popen[bytes] | None = None
        self.devices: dict[str, subprocess.Popen[bytes]] = {}
        self.device_python = sys.executable  # a board's interpreter, e.g. CPython 3.8 as on JetPack 5
        sweep_and_report()  # what killed runs (or killed tests) left
        self.ledger = RunLedger().open(run)  # removed by stop_all; left for the next sweep if we are killed

    def _spawn(self, name: str, args: list[str], python: str = sys.executable) -> subprocess.Popen[bytes]:
        log = (self.run / "logs" / f"{name}.log").open("ab")
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.Popen([python, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
        if self.ledger.path is None:  # started again after stop_all (a restart test)
            self.ledger.open(self.run)
        self.ledger.add_process(name, proc.pid)
        return proc

    def start_server(self, resume: bool = False) -> None:
        args = ["-m", "server", "--config", str(self.run / "configs" / "server.toml"), "--out", str(self.run),
                "--broker", self.broker_url]
        self.server = self._spawn("server", args + (["--resume"] if resume else []))

    def start_device(self, device_id: str) -> None:
        cfg = self.run / "configs" / f"{device_id}.toml"
        compile_runtime(self.device_python)
        self.devices[device_id] = self._spawn(device_id, [*PYTHON_FLAGS, "-m", "runtime", "--config", str(cfg),
                                                          "--broker", self.broker_url], self.device_python)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.server if name == "server" else self.devices.get(name)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(10)

    def stop_all(self, grace_s: float = 5.0) -> None:
        stop_process_groups([p for p in [self.server, *self.devices.values()] if p is not None], grace_s)
        self.ledger.close()


def server_rows(run: Path) -> list[dict[str, str]]:
    path = run / "server.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _server_error(run: Path) -> str:
    """The server's own last word from its log: its `error:` line, else its last line."""
    path = run / "logs" / "server.log"
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.exists() else []
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["(its log is empty)"])[-1].removeprefix("error: ")


def run_federation(spec: FederationSpec, force: bool = False,
                   progress: Callable[[list[dict[str, str]]], None] | None = None) -> dict[str, Any]:
    """Run it; `progress` gets the server.csv rows that are new since its last call (one per
    version), so every version is shown with its own accuracy."""
    run = prepare(spec, force)
    broker: Broker = open_broker(spec.broker, lab=load_lab(run))
    started = time.monotonic()
    with broker:
        fed = Federation(run, broker.url)
        fed.ledger.add_process("broker", broker.pid, broker.scratch_dir)
        try:
            fed.start_server()
            for device_id in spec.device_ids():
                fed.start_device(device_id)
            seen = 0
            assert fed.server is not None
            while fed.server.poll() is None:
                time.sleep(0.3)
                rows = server_rows(run)
                if progress is not None and len(rows) > seen:
                    progress(rows[seen:])
                    seen = len(rows)
                if time.monotonic() - started > spec.time_limit_s + 60:
                    raise ConfigError(f"federation did not finish within {spec.time_limit_s + 60:.0f} s")
        finally:
            fed.stop_all()
    from testbed.report import write_report

    # The report keeps keys it does not compute itself, such as the server's exit code.
    exit_code = fed.server.returncode if fed.server else None
    if exit_code != 0 and not (run / "server.csv").exists():
        raise OrchardError(f"the server exited with code {exit_code} before it wrote anything: {_server_error(run)}")
    (run / "summary.json").write_text(json.dumps({"server_exit": exit_code}) + "\n")
    summary: dict[str, Any] = write_report(run)
    return summary
