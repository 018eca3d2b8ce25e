"""`orchard simulate FILE --clients N`: N simulated clients that really train, on a virtual clock.

The campaign file gives the model, data, partition, [train] and [[fleet]]: client i takes the
board and availability trace of a fleet group (groups in proportion to their counts), and its
shard is part i of the training set split N ways by [model] partition. The round engine is the
one the server runs (server.engine, driven by server.memory.simulate on a VirtualClock); every
round it samples `per_round` of the idle online clients at random (EngineConfig.sample_seed) and
each trains for real: the same trainer a board runs (runtime.trainer, ONNX Runtime artifacts),
from the weights it was sent, on its own shard, in a pool of worker processes (local) or Ray
actors. A client's task takes `local_steps x board step time` of virtual time, the board step
time being this host's measured step (CPU time) scaled by host speed / board speed (one core's worth: small
models hardly use more); the CPU trace at dispatch slows it further. Workers hold the training
set once and get a client's shard as indices, so memory grows with the clients training at once
(the pool) and not with N; the engine keeps only a small record per client that said hello.

Methods: fedavg's dense model only for now (other methods' device halves need the profile and
submodel plumbing of runtime.agent, which this harness does not repeat yet).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psutil

from runtime.board import load_board
from runtime.errors import ConfigError
from runtime.protocol import Hello
from runtime.trainer import TrainConfig, Trainer
from server.aggregate import FloatArray, IndexArray
from server.memory import Availability, simulate
from server.policies import DenseModel
from server.records import EngineConfig
from server.strategies import get_strategy
from testbed.calibrate import get_host_speed
from testbed.campaign import Campaign
from testbed.traces import AvailabilityTrace, CpuTrace, make_availability, make_cpu_trace

SIM_ENGINES = ("local", "ray")
Arr = npt.NDArray[Any]
_HORIZONS_S = (60.0, 600.0, 6_000.0, 60_000.0, 600_000.0, 6_000_000.0)


class TraceAvailability(Availability):
    """A testbed availability trace as the virtual-clock loop asks for it."""

    def __init__(self, trace: AvailabilityTrace) -> None:
        self.trace = trace

    def online_at(self, t: float) -> bool:
        return self.trace.online_at(t)

    def next_change(self, t: float) -> float | None:
        for horizon in _HORIZONS_S:
            later = [at for at, _ in self.trace.changes(t + horizon, since_s=t) if at > t]
            if later:
                return later[0]
        return None


# ------------------------------------------------------------------------ the worker side
_WORKER: dict[str, Any] = {}


def _worker_init(artifacts: str, x: Arr, y: Arr) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER.update(trainer=Trainer(artifacts, threads=1), x=x, y=y)


def _worker_train(base: Arr, shard: Arr, cfg: TrainConfig, upload: str) -> Arr:
    trainer: Trainer = _WORKER["trainer"]
    result = trainer.train(base, _WORKER["x"][shard], _WORKER["y"][shard], cfg)
    weights = np.asarray(result.weights, dtype=np.float32)
    return weights - base if upload == "delta" else weights


class RayTrainer:
    """One Ray actor: a worker process of the pool (wrapped with ray.remote at run time)."""

    def __init__(self, artifacts: str, x: Arr, y: Arr) -> None:
        _worker_init(artifacts, x, y)

    def train(self, base: Arr, shard: Arr, cfg: TrainConfig, upload: str) -> Arr:
        return _worker_train(base, shard, cfg, upload)


class Pool:
    """Local processes (concurrent.futures) or Ray actors; `submit` returns a Future either way."""

    def __init__(self, engine: str, workers: int, artifacts: str, x: Arr, y: Arr) -> None:
        self.engine = engine
        if engine == "local":
            import multiprocessing as mp

            self._local = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                                 initargs=(artifacts, x, y))
            return
        import ray

        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING, log_to_driver=False)
        self._ray = ray
        remote = ray.remote(num_cpus=1)(RayTrainer)
        x_ref, y_ref = ray.put(x), ray.put(y)  # one copy in the object store, not one per actor call
        self._actors: list[Any] = [remote.remote(artifacts, x_ref, y_ref) for _ in range(workers)]
        self._next = 0

    def submit(self, base: Arr, shard: Arr, cfg: TrainConfig, upload: str) -> cf.Future[Any]:
        if self.engine == "local":
            return self._local.submit(_worker_train, base, shard, cfg, upload)
        actor = self._actors[self._next % len(self._actors)]
        self._next += 1
        future: cf.Future[Any] = actor.train.remote(base, shard, cfg, upload).future()
        return future

    def close(self) -> None:
        if self.engine == "local":
            self._local.shutdown(cancel_futures=True)
        else:
            for a in self._actors:
                self._ray.kill(a)
            if self._started_ray:
                self._ray.shutdown()


# ------------------------------------------------------------------------ the clients
@dataclass(eq=False)
class TrainedClient:
    """What server.memory.simulate needs of a device, training for real through the pool."""

    device_id: str
    n_samples: int
    step_s: float  # board seconds per local step
    local_steps: int
    availability: Availability
    cpu: CpuTrace
    shard: IndexArray
    pool: Pool
    cfg: TrainConfig
    kind: str = "weights"
    redeliver: bool = False
    upload_s: float = 0.0
    profiles: tuple[str, ...] = ("dense",)
    _now: Callable[[], float] = field(default=lambda: 0.0)

    @property
    def duration_s(self) -> float:
        return self.local_steps * self.step_s / max(0.01, self.cpu.value_at(self._now()))

    def train(self, base: FloatArray, indices: IndexArray | None) -> Any:
        if indices is not None:
            raise ConfigError("orchard simulate trains the dense model only (fedavg)")
        return self.pool.submit(np.asarray(base, dtype=np.float32), self.shard, self.cfg, self.kind)

    def hello(self) -> Hello:
        return Hello(device_id=self.device_id, board="sim", cores=1.0, ram_mb=1024, runtime_version="sim",
                     profiles=self.profiles, n_samples=self.n_samples, label_histogram=())


@dataclass(frozen=True)
class SimulationResult:
    summary: dict[str, Any]
    curve: list[dict[str, Any]]


class _PeakRss:
    """Peak RSS of this process plus its children (the pool), sampled every 0.2 s."""

    def __init__(self, ray: bool) -> None:
        self.peak_mb, self._halt, self.ray = 0.0, threading.Event(), ray
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        # Ray's actors are children of its raylet, not of this process.
        for proc in psutil.process_iter(["name", "cmdline"]) if self.ray else []:
            with contextlib.suppress(psutil.Error):
                if "RayTrainer" in " ".join(proc.info["cmdline"] or []) or "RayTrainer" in (proc.info["name"] or ""):
                    total += proc.memory_info().rss
        self.peak_mb = max(self.peak_mb, total / 2**20)

    def _run(self) -> None:
        while not self._halt.wait(0.2):
            self._sample()

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sample()
        self._halt.set()
        self._thread.join()


def _host_step_s(artifacts: str, x: Arr, y: Arr, batch_size: int, lr: float) -> float:
    """This host's step, one thread, on the model the clients train (after a warm-up), in CPU
    time: wall time on a shared host measured 4.2 and 28.5 ms for the same LeNet step in two runs."""
    trainer = Trainer(artifacts, threads=1)
    n = min(len(y), batch_size * 8)
    trainer.train(None, x[:n], y[:n], TrainConfig(steps=3, batch_size=batch_size, lr=lr))
    result = trainer.train(None, x[:n], y[:n], TrainConfig(steps=20, batch_size=batch_size, lr=lr))
    return result.cpu_s / result.steps


def run_simulation(c: Campaign, n_clients: int, per_round: int, rounds: int, *, engine: str = "local",
                   workers: int = 1, target_accuracy: float | None = None, eval_every: int = 1,
                   eval_samples: int | None = None, out: Path | None = None) -> SimulationResult:
    from models.artifacts import artifacts_for
    from models.builder import build
    from models.datasets import load_dataset, train_test_split
    from models.partition import parse_partition, partition
    from models.structure import full_structure

    if engine not in SIM_ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(SIM_ENGINES)}; got {engine!r}")
    if c.method not in (None, "fedavg") or any(p != "dense" for g in c.fleet for p in g.profiles):
        raise ConfigError(f"orchard simulate runs fedavg on the dense model only; the campaign has method "
                          f"{c.method!r} and profiles {sorted({p for g in c.fleet for p in g.profiles})}")
    for name, value, lo in (("--clients", n_clients, 1), ("--per-round", per_round, 1), ("--rounds", rounds, 1),
                            ("--workers", workers, 1), ("--eval-every", eval_every, 1)):
        if value < lo:
            raise ConfigError(f"{name} must be >= {lo}; got {value}")
    if per_round > n_clients:
        raise ConfigError(f"--per-round {per_round} is more than --clients {n_clients}")
    started = time.perf_counter()
    ds = load_dataset(c.dataset, c.data_root, seed=c.seed, n=c.samples, shape=c.input_shape)
    train, held_out = train_test_split(ds, c.eval_fraction, seed=c.seed)
    scheme, kwargs = parse_partition(c.partition)
    try:
        shards = partition(train.y, n_clients, scheme, seed=c.seed, **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"--clients {n_clients}: [model] partition {exc}") from None
    if any(len(s) == 0 for s in shards):
        raise ConfigError(f"--clients {n_clients}: some shards of the {len(train.y)} training samples are empty; "
                          "use fewer clients or more [model] samples")
    artifacts = str(artifacts_for(c.model, ds.input_shape, ds.num_classes, ["dense"])["dense"].directory)
    init = build(full_structure(c.model, ds.input_shape, ds.num_classes), seed=c.seed).init
    x_eval, y_eval = held_out.x[:eval_samples], held_out.y[:eval_samples]
    x_train, y_train = np.ascontiguousarray(train.x, dtype=np.float32), np.asarray(train.y, dtype=np.int64)

    host = get_host_speed(pinned=c.host_speed)
    host_step_s = _host_step_s(artifacts, x_train, y_train, c.batch_size, c.lr)
    weights = np.array([g.count for g in c.fleet], dtype=float)
    group_of = np.searchsorted(np.cumsum(weights / weights.sum()), (np.arange(n_clients) + 0.5) / n_clients)
    base = c.source.parent if c.source is not None else Path.cwd()
    steps = c.local_steps if c.local_steps > 0 else c.local_epochs * -(-len(train.y) // (n_clients * c.batch_size))
    evaluator = Trainer(artifacts, threads=1)
    curve: list[dict[str, Any]] = []

    def metric(flat: FloatArray) -> float:
        version = len(curve) + 1
        if version % eval_every and version != rounds:
            curve.append({"version": version, "accuracy": None})
            return math.nan
        acc = evaluator.evaluate(np.asarray(flat, dtype=np.float32), x_eval, y_eval).accuracy
        curve.append({"version": version, "accuracy": round(acc, 5)})
        return acc

    with _PeakRss(engine == "ray") as rss:
        pool = Pool(engine, workers, artifacts, x_train, y_train)
        try:
            from server.memory import VirtualClock

            clock = VirtualClock()
            clients = []
            for i in range(n_clients):
                g = c.fleet[int(group_of[i])]
                board = load_board(g.board)
                cid = f"{g.name}-{i}"
                # Board step time: this host's one-thread step, slowed by how much slower the board's core is.
                step_s = host_step_s * host.speed_factor / board.speed_factor
                cfg = TrainConfig(steps=steps, batch_size=c.batch_size, lr=c.lr, seed=c.seed * 100_003 + i)
                clients.append(TrainedClient(
                    cid, len(shards[i]), step_s, steps,
                    TraceAvailability(make_availability(g.availability, seed=c.seed + i, base_dir=base, device=cid,
                                                        index=i)),
                    make_cpu_trace(g.cpu, seed=c.seed + 1000 + i, base_dir=base, device=cid, index=i),
                    shards[i], pool, cfg, kind=c.upload, _now=clock))
            strategy = get_strategy("fedavg", clients_per_round=per_round)
            config = EngineConfig(target_version=rounds, sample_seed=c.seed, eval_every=0, min_devices=per_round,
                                  max_devices=max(n_clients, EngineConfig.max_devices))
            result = simulate(strategy, clients, initial_global=init, until_version=rounds,  # type: ignore[arg-type]
                              model=DenseModel(int(init.size)), config=config, clock=clock, metric=metric,
                              keep_logs=False)
        finally:
            pool.close()
    wall_s = time.perf_counter() - started
    for point, record in zip(curve, result.versions, strict=False):
        point.update(t_s=round(record.t, 3), n_updates=record.n_updates, clients=list(record.device_ids))
    scored = [p for p in curve if p["accuracy"] is not None]
    target = target_accuracy if target_accuracy is not None else c.target_accuracy
    reached = [p for p in scored if target is not None and p["accuracy"] >= target]
    summary = {
        "campaign": c.name, "model": c.model, "dataset": c.dataset, "partition": c.partition, "engine": engine,
        "workers": workers, "clients": n_clients, "per_round": per_round, "rounds": len(result.versions),
        "local_steps": steps, "batch_size": c.batch_size, "lr": c.lr, "seed": c.seed,
        "final_accuracy": scored[-1]["accuracy"] if scored else None,
        "best_accuracy": max((p["accuracy"] for p in scored), default=None),
        "target_accuracy": target, "time_to_target_s": reached[0]["t_s"] if reached else None,
        "virtual_s": round(clock.now, 3), "wall_s": round(wall_s, 1), "peak_rss_mb": round(rss.peak_mb, 1),
        "host_step_ms": round(host_step_s * 1e3, 3), "host_speed_factor": round(host.speed_factor, 4),
        "distinct_clients_trained": len({cid for p in curve for cid in p.get("clients", [])}),
        "eval_samples": len(y_eval), "finish_reason": result.finish_reason,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "simulation.json").write_text(json.dumps({"summary": summary, "curve": curve}, indent=1) + "\n")
    return SimulationResult(summary, curve)
