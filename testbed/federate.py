"""A local federation: a broker, the server and N device processes on this host, untrothttled.

`prepare()` lays out a run folder the way a real deployment has it: per-device data shards and
TOML configs, the server's TOML, the artifacts (generated here, where onnx is; each device
starts with an empty artifact cache and receives them over MQTT), the initial global weights
and the held-out evaluation split. `Federation` then runs the processes and watches server.csv.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.artifacts import ensure_artifacts
from models.builder import build
from models.datasets import load_dataset, train_test_split
from models.partition import parse_partition, partition
from models.structure import full_structure, sub_structure
from runtime.errors import ConfigError
from runtime.profile import parse_profile
from runtime.submodel import index_map_for
from testbed.broker import Broker, open_broker

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

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ConfigError(f"--devices {self.devices}: need at least one device")
        if self.rounds < 1:
            raise ConfigError(f"--rounds {self.rounds}: need at least one round")

    def device_ids(self) -> list[str]:
        return [f"dev{i}" for i in range(self.devices)]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_toml(path: Path, tables: Mapping[str, Mapping[str, Any]]) -> None:
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)
        lines.append("")
    path.write_text("\n".join(lines))


def prepare(spec: FederationSpec, force: bool = False) -> Path:
    """Write the run folder; returns it. Refuses an existing folder unless `force`."""
    run = spec.out
    if run.exists():
        if not force:
            raise ConfigError(f"run folder {run} exists; pass --force to replace it")
        shutil.rmtree(run)
    for sub in ("shards", "configs", "cache", "logs"):
        (run / sub).mkdir(parents=True)
    ds = load_dataset(spec.dataset, spec.data_root, seed=spec.seed)
    train, held_out = train_test_split(ds, spec.eval_fraction, seed=spec.seed)
    np.savez(run / "eval.npz", x=held_out.x, y=held_out.y)
    scheme, kwargs = parse_partition(spec.partition)
    parts = partition(train.y, spec.devices, scheme, seed=spec.seed, **kwargs)

    full = full_structure(spec.model, ds.input_shape, ds.num_classes)
    built = build(full, seed=spec.seed)
    np.save(run / "init.npy", built.init)
    ids = spec.device_ids()
    profile_of = {d: parse_profile(spec.profiles[i % len(spec.profiles)]).canonical() for i, d in enumerate(ids)}
    dirs: dict[str, str] = {}
    fallbacks = tuple(parse_profile(p).canonical() for p in spec.fallback_profiles)
    for profile in sorted({*profile_of.values(), *fallbacks, "dense"}):
        imap = index_map_for(parse_profile(profile), built.layout.groups)
        structure = sub_structure(full, imap)
        dirs[profile] = str(ensure_artifacts(structure).directory)
    (run / "artifacts.json").write_text(json.dumps(
        {"model": spec.model, "init": "init.npy", "global": dirs["dense"], "profiles": dirs}, indent=1))

    root = f"orchard/{run.name}"
    for i, (device_id, idx) in enumerate(zip(ids, parts, strict=True)):
        np.savez(run / "shards" / f"{device_id}.npz", x=train.x[idx], y=train.y[idx])
        write_toml(run / "configs" / f"{device_id}.toml", {
            "device": {"id": device_id, "board": spec.boards[i % len(spec.boards)],
                       "shard": f"../shards/{device_id}.npz", "artifact_cache": f"../cache/{device_id}",
                       "profiles": list(dict.fromkeys((profile_of[device_id], *fallbacks)))},
            "broker": {"url": "mqtt://127.0.0.1:1883", "root": root, "keepalive_s": spec.keepalive_s},
        })
    write_toml(run / "configs" / "server.toml", {
        "server": {"id": "server", "root": root, "artifacts": "../artifacts.json", "eval_data": "../eval.npz",
                   "seed": spec.seed},
        "rounds": {"strategy": spec.strategy, "target_version": spec.rounds, "time_limit_s": spec.time_limit_s,
                   "min_devices": spec.devices, "task_timeout_s": spec.task_timeout_s},
        "strategy": dict(spec.strategy_params),
        "train": {"local_steps": spec.local_steps, "lr": spec.lr, "batch_size": spec.batch_size},
        "assign": {"default": "dense", "devices": profile_of},
    })
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

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.run / "logs" / f"{name}.log").open("ab")
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)

    def start_server(self, resume: bool = False) -> None:
        args = ["-m", "server", "--config", str(self.run / "configs" / "server.toml"), "--out", str(self.run),
                "--broker", self.broker_url]
        self.server = self._spawn("server", args + (["--resume"] if resume else []))

    def start_device(self, device_id: str) -> None:
        cfg = self.run / "configs" / f"{device_id}.toml"
        self.devices[device_id] = self._spawn(device_id, ["-m", "runtime", "--config", str(cfg),
                                                          "--broker", self.broker_url])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.server if name == "server" else self.devices.get(name)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(10)

    def stop_all(self, grace_s: float = 5.0) -> None:
        procs = [p for p in [self.server, *self.devices.values()] if p is not None and p.poll() is None]
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


def server_rows(run: Path) -> list[dict[str, str]]:
    path = run / "server.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def run_federation(spec: FederationSpec, force: bool = False,
                   progress: Callable[[list[dict[str, str]]], None] | None = None) -> dict[str, Any]:
    run = prepare(spec, force)
    broker: Broker = open_broker(spec.broker)
    started = time.monotonic()
    with broker:
        fed = Federation(run, broker.url)
        try:
            fed.start_server()
            for device_id in spec.device_ids():
                fed.start_device(device_id)
            seen = 0
            assert fed.server is not None
            while fed.server.poll() is None:
                time.sleep(0.3)
                rows = server_rows(run)
                if progress is not None and len(rows) != seen:
                    seen = len(rows)
                    progress(rows)
                if time.monotonic() - started > spec.time_limit_s + 60:
                    raise ConfigError(f"federation did not finish within {spec.time_limit_s + 60:.0f} s")
        finally:
            fed.stop_all()
    rows = server_rows(run)
    accuracies = [float(r["accuracy"]) for r in rows if r.get("accuracy")]
    summary = {
        "run": str(run), "strategy": spec.strategy, "devices": spec.devices, "rounds": len(rows),
        "wall_s": round(time.monotonic() - started, 2),
        "first_accuracy": accuracies[0] if accuracies else None,
        "final_accuracy": accuracies[-1] if accuracies else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        "server_exit": fed.server.returncode if fed.server else None,
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
