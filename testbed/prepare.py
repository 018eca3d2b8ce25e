"""Lay out a run folder the way a real deployment has it.

Per-device data shards and TOML configs, the server's TOML, the training artifacts (generated
here, where onnx is; each device starts with an empty artifact cache and receives them over
MQTT), the initial global weights, the held-out evaluation split, and the lab's secrets
(testbed/lab_secrets.py: logins, per-device HMAC keys, the run id, a CA when `tls`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.artifacts import artifacts_for, profile_structure
from models.builder import build
from models.datasets import load_dataset, train_test_split
from models.losses import DEFAULT_VARIANT
from models.methods import method_artifacts
from models.partition import parse_partition, partition
from models.structure import full_structure
from runtime.device_config import DEFAULT_POLL_S, DEFAULT_TRAINER_START_TIMEOUT_S
from runtime.errors import ConfigError
from runtime.methods import spec
from runtime.profile import parse_profile, split_variant
from runtime.protocol import check_topic_root
from testbed.lab_secrets import provision


@dataclass(frozen=True)
class DevicePlan:
    device_id: str
    board: str
    profiles: tuple[str, ...]  # the first is assigned; the others are what it may fall back to
    group: str = ""
    threads: int = 0  # ORT threads; 0: the device derives them from its cgroup quota


@dataclass(frozen=True)
class DataPlan:
    model: str
    dataset: str = "digits"
    data_root: str | None = None
    partition: str = "iid"
    eval_fraction: float = 0.2
    seed: int = 0
    samples: int | None = None  # a stratified subset (or, for synthetic, how many to generate)
    input_shape: tuple[int, ...] | None = None  # synthetic only: per-sample (C, H, W)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_toml(path: Path, tables: Mapping[str, Mapping[str, Any]]) -> None:
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)
        lines.append("")
    path.write_text("\n".join(lines))


def fresh_run_dir(run: Path, force: bool) -> None:
    if run.exists():
        if not force:
            raise ConfigError(f"run folder {run} exists; pass --force to replace it")
        shutil.rmtree(run)
    for sub in ("shards", "configs", "cache", "logs", "devices"):
        (run / sub).mkdir(parents=True)
    run.chmod(0o750)  # private to its owner and group whatever the umask (the CLI's is 027)


def _stratified(labels: npt.NDArray[np.int64], n: int, seed: int) -> npt.NDArray[np.int64]:
    """About `n` indices with every class equally represented (as far as its samples allow)."""
    rng = np.random.default_rng([seed, 7])
    classes = np.unique(labels)
    per = max(1, n // len(classes))
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes]
    return np.sort(np.concatenate(picks))


def prepare_run(run: Path, data: DataPlan, devices: Sequence[DevicePlan], server: Mapping[str, Mapping[str, Any]],
                keepalive_s: int = 5, offline: str = "unreachable", telemetry_hz: float = 1.0,
                poll_s: float = DEFAULT_POLL_S, trainer_start_timeout_s: float = DEFAULT_TRAINER_START_TIMEOUT_S,
                tls: bool = False, client_certs: bool = False) -> dict[str, str]:
    """Write shards, artifacts, init weights, eval split and every config into `run` (which
    `fresh_run_dir` made). `server` holds the [rounds], [strategy] and [train] tables of the
    server TOML. Returns the artifact directory per profile."""
    root = check_topic_root(f"orchard/{run.name}")  # a run named "a+b" would subscribe to others' topics
    ds = load_dataset(data.dataset, data.data_root, seed=data.seed, n=data.samples, shape=data.input_shape)
    train, held_out = train_test_split(ds, data.eval_fraction, seed=data.seed)
    np.savez(run / "eval.npz", x=held_out.x, y=held_out.y)
    scheme, kwargs = parse_partition(data.partition)
    parts = partition(train.y, len(devices), scheme, seed=data.seed, **kwargs)

    method_tbl = dict(server.get("method", {}))
    method = method_tbl.pop("name", None)
    params = spec(method).params(method_tbl) if method else {}
    extra_spec: dict[str, Any] = {}
    if method:
        # A method whose profiles depend on the data (Chen & Qin's classes) fills them in here,
        # from each shard's label histogram; the first profile is the one the device is assigned.
        hists = [np.bincount(train.y[idx], minlength=ds.num_classes).tolist() for idx in parts]
        groups = full_structure(data.model, ds.input_shape, ds.num_classes).channels
        firsts = spec(method).fleet_profiles(params, [d.profiles[0] for d in devices], hists, groups)
        devices = [dataclasses.replace(d, profiles=(f, *d.profiles[1:])) for d, f in zip(devices, firsts, strict=True)]
        n_proxy = spec(method).proxy_samples(params)
        if n_proxy:
            pick = _stratified(train.y, n_proxy, data.seed)
            np.savez(run / "proxy.npz", x=train.x[pick], y=train.y[pick])
            extra_spec["proxy"] = "proxy.npz"
    # The global model is the method's (Co-S²P's holds every exit head); "dense" by default.
    global_profile = spec(method).global_profile(params) if method else "dense"
    structural, variant = split_variant(global_profile)
    full = profile_structure(full_structure(data.model, ds.input_shape, ds.num_classes),
                             parse_profile(structural), variant or DEFAULT_VARIANT)
    built = build(full, seed=data.seed)
    np.save(run / "init.npy", built.init)
    profiles = sorted({p for d in devices for p in d.profiles})
    sets = {**artifacts_for(data.model, ds.input_shape, ds.num_classes, [global_profile]),
            **method_artifacts(method, params, data.model, ds.input_shape, ds.num_classes, profiles)}
    # Names with "@" are artifacts a server half runs itself (Chen & Qin's relevance), not profiles.
    dirs = {p: str(a.directory) for p, a in sorted(sets.items()) if not p.startswith("@")}
    extra = {p[1:]: str(a.directory) for p, a in sorted(sets.items()) if p.startswith("@")}
    if extra:
        extra_spec["extra"] = extra
    auxiliary = sorted({a for p in profiles for a in spec(method).auxiliary_artifacts(
        spec(method).parse_profile(p, params), params)}) if method else []
    (run / "artifacts.json").write_text(json.dumps(
        {"model": data.model, "init": "init.npy", "global": dirs[global_profile], "profiles": dirs,
         "auxiliary": auxiliary, **extra_spec}, indent=1))

    lab = provision(run, root, [d.device_id for d in devices], tls=tls, client_certs=client_certs)
    ca_file = "../secrets/ca.crt" if tls else None

    def client_cert(name: str) -> dict[str, str | None]:
        if not client_certs:
            return {}
        return {"cert_file": f"../secrets/{name}.crt", "key_file": f"../secrets/{name}.key"}

    for plan, idx in zip(devices, parts, strict=True):
        np.savez(run / "shards" / f"{plan.device_id}.npz", x=train.x[idx], y=train.y[idx])
        write_toml(run / "configs" / f"{plan.device_id}.toml", {
            "device": {"id": plan.device_id, "board": plan.board, "shard": f"../shards/{plan.device_id}.npz",
                       "artifact_cache": f"../cache/{plan.device_id}", "profiles": list(plan.profiles),
                       "offline": offline, "threads": plan.threads or None, "telemetry_hz": telemetry_hz,
                       "poll_s": poll_s, "trainer_start_timeout_s": trainer_start_timeout_s},
            "broker": {"url": "mqtt://127.0.0.1:1883", "root": root, "keepalive_s": keepalive_s,
                       "credentials": f"../secrets/{plan.device_id}.toml", "run_id": lab.run_id, "ca_file": ca_file,
                       **client_cert(plan.device_id)},
        })
    write_toml(run / "configs" / "server.toml", {
        "server": {"id": "server", "root": root, "artifacts": "../artifacts.json", "eval_data": "../eval.npz",
                   "seed": data.seed, "roster": [d.device_id for d in devices],
                   "credentials": "../secrets/server.toml", "run_id": lab.run_id,
                   "ca_file": ca_file, **client_cert(lab.server.username)},
        **server,
        "assign": {"default": "dense", "devices": {d.device_id: d.profiles[0] for d in devices},
                   "shard_samples": {d.device_id: len(idx) for d, idx in zip(devices, parts, strict=True)}},
    })
    return dirs
