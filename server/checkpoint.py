"""Atomic checkpoints of the global model and the engine state, and `--resume` from them.

Layout under `<run_dir>/checkpoint/`:
    ckpt-000007-global.npy    the global model (float32)
    ckpt-000007-history.npz   earlier global versions that outstanding tasks started from
    state.json                the commit record: version, round, devices, tasks, file names, sha256

Each file is written to `*.tmp`, fsynced and `os.replace`d; `state.json` goes last and is the
commit point, so a crash at any moment leaves either the previous checkpoint or the new one,
never a mix. Files of older saves are deleted only after the new state.json is in place.

This module is the engine's persistence half: it reads and rebuilds engine internals on purpose.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ConfigError
from runtime.protocol import Hello
from server.aggregate import FloatArray
from server.engine import DeviceRecord, Engine, EngineConfig, TaskRecord, _frozen
from server.methods import ServerMethod
from server.policies import AssignPolicy, ModelOps, Strategy
from server.strategies import get_strategy

FORMAT = 1
STATE_FILE = "state.json"


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / "checkpoint"


# ---------------------------------------------------------------- engine <-> JSON
def engine_state(engine: Engine) -> dict[str, Any]:
    """Everything but the arrays. Updates pending at this moment are not kept: save right after
    a NewGlobal (nothing is pending then under every strategy here)."""
    e = engine
    return {
        "format": FORMAT,
        "strategy": {"name": e.strategy.name, "params": dict(e.strategy.params)},
        "version": e.version,
        "round": e.round,
        "finished": e.finished,
        "now_s": e._clock(),
        "start_s": e._start_s,
        "round_started_s": e._round_started_s,
        "started": e._started,
        "task_seq": e._task_seq,
        "devices": [
            {**dataclasses.asdict(d), "hello": _hello_state(d.hello)} for d in e._devices.values()
        ],
        "tasks": [_task_state(e, t) for t in e._tasks.values()],
        "history_versions": sorted(e._history),
    }


def _hello_state(hello: Hello) -> dict[str, Any]:
    """What the engine uses of a hello. Its artifact list is the service's business (which
    artifacts to send) and is re-announced by the next hello; state.json is rewritten after
    every aggregation, so it carries only what a resumed engine needs."""
    return {k: v for k, v in dataclasses.asdict(hello).items() if k != "artifacts"}


def _task_state(e: Engine, t: TaskRecord) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(t, k) for k in ("task_id", "device_id", "round", "base_version", "profile",
                                                      "dispatched_s")}
    if not e.method.for_profile(t.profile).indices_derivable and t.indices is not None:
        out["indices"] = t.indices.tolist()
    return out


def restore_engine(
    state: Mapping[str, Any],
    global_flat: FloatArray,
    history: Mapping[int, FloatArray],
    *,
    model: ModelOps,
    clock: Callable[[], float],
    strategy: Strategy | None = None,
    config: EngineConfig | None = None,
    assign: AssignPolicy | None = None,
    method: ServerMethod | None = None,
) -> Engine:
    """Rebuild an engine that continues from `state`. Times are shifted so that the moment of
    the save maps to `clock()` now: the downtime counts against no deadline."""
    if state.get("format") != FORMAT:
        raise ConfigError(f"checkpoint format {state.get('format')!r}, this build reads {FORMAT}")
    saved = state["strategy"]
    if strategy is None:
        strategy = get_strategy(saved["name"], **saved["params"])
    elif strategy.name != saved["name"]:
        raise ConfigError(f"checkpoint was written by strategy {saved['name']!r}, resuming with {strategy.name!r}")
    e = Engine(strategy, model, global_flat, clock=clock, config=config, assign=assign, method=method)
    shift = clock() - float(state["now_s"])
    e.version = int(state["version"])
    e.round = int(state["round"])
    e.finished = bool(state["finished"])
    e._start_s = float(state["start_s"]) + shift
    e._round_started_s = float(state["round_started_s"]) + shift
    e._started = bool(state["started"])
    e._task_seq = int(state["task_seq"])
    e._history = {int(v): _frozen(np.array(a, dtype=np.float32)) for v, a in history.items()}
    e._history[e.version] = e.global_flat
    e.method.on_global(e.version, e.global_flat)  # the restored version, not the 0 of construction
    for d in state["devices"]:
        h = d["hello"]
        hello = Hello(**{**h, **{k: tuple(h.get(k, ())) for k in ("profiles", "label_histogram", "artifacts")}})
        e.method.on_hello(d["device_id"], hello)
        last = d["last_dispatch_s"]
        rec = DeviceRecord(**{**d, "hello": hello, "online": False,
                              "last_dispatch_s": None if last is None else last + shift})
        e._devices[rec.device_id] = rec
        # Through _set, so the online/idle sets and the task-time median are rebuilt too.
        e._set(rec, online=bool(d["online"]), state="idle" if rec.state == "done" else rec.state)
    for t in state["tasks"]:
        assignment, indices = e.assignment_for(t["profile"], int(t["round"]))
        stored = t.pop("indices", None)
        if stored is not None:  # not a function of (profile, round): the method's own choice
            indices = np.asarray(stored, dtype=np.int64)
        task = TaskRecord(**{**t, "dispatched_s": t["dispatched_s"] + shift}, indices=indices,
                          assignment=assignment)
        if task.base_version not in e._history:
            raise ConfigError(f"checkpoint misses base version {task.base_version} of task {task.task_id!r}")
        e._tasks[task.task_id] = task
    e._closed = OrderedDict()
    return e


# ---------------------------------------------------------------- files
def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_state(directory: Path) -> dict[str, Any] | None:
    path = directory / STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint {path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"checkpoint {path} is not a JSON object")
    return data


def save(run_dir: str | os.PathLike[str], engine: Engine) -> Path:
    """Write a checkpoint of `engine`; returns the state.json path."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    previous = _read_state(directory)
    seq = int(previous["save_seq"]) + 1 if previous else 1
    stem = f"ckpt-{seq:06d}"
    global_file, history_file = f"{stem}-global.npy", f"{stem}-history.npz"
    _write_atomic(directory / global_file, lambda f: np.save(f, engine.global_flat, allow_pickle=False))
    older = {f"v{v}": a for v, a in engine._history.items() if v != engine.version}
    _write_atomic(directory / history_file, lambda f: np.savez(f, **older))
    state = engine_state(engine)
    state.update(save_seq=seq, global_file=global_file, history_file=history_file,
                 global_sha256=_sha256(directory / global_file))
    blob = json.dumps(state, indent=1, default=_jsonable).encode()
    _write_atomic(directory / STATE_FILE, lambda f: f.write(blob))
    _fsync_dir(directory)
    # Only now is the new checkpoint committed; the previous one's files can go.
    for path in directory.glob("ckpt-*"):
        if path.name not in (global_file, history_file):
            path.unlink(missing_ok=True)
    return directory / STATE_FILE


def latest_version(run_dir: str | os.PathLike[str]) -> int | None:
    state = _read_state(checkpoint_dir(run_dir))
    return None if state is None else int(state["version"])


def load(
    run_dir: str | os.PathLike[str],
    *,
    model: ModelOps,
    clock: Callable[[], float],
    strategy: Strategy | None = None,
    config: EngineConfig | None = None,
    assign: AssignPolicy | None = None,
    method: ServerMethod | None = None,
) -> Engine:
    """The engine of the last committed checkpoint in `run_dir`; ConfigError if there is none
    or it does not verify."""
    directory = checkpoint_dir(run_dir)
    state = _read_state(directory)
    if state is None:
        raise ConfigError(f"no checkpoint in {directory} (nothing to resume)")
    try:
        global_path = directory / state["global_file"]
        if _sha256(global_path) != state["global_sha256"]:
            raise ConfigError(f"checkpoint {global_path} does not match its sha256 in {STATE_FILE}")
        global_flat = np.load(global_path, allow_pickle=False)
        with np.load(directory / state["history_file"], allow_pickle=False) as npz:
            history = {int(k[1:]): np.asarray(npz[k]) for k in npz.files}
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"checkpoint in {directory} is incomplete: {exc!r}") from exc
    return restore_engine(state, global_flat, history, model=model, clock=clock, strategy=strategy,
                          config=config, assign=assign, method=method)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"checkpoint cannot store {type(value).__name__} {value!r}")
