"""`orchard mpsl run`: one MP-SL (or FedAvg baseline) configuration on this host, measured.

Compute nodes (`python -m runtime.compute_node`) and data owners (`python -m runtime.mpsl_owner`)
run as processes, each in its own cgroup: an owner gets its board's quota (one ORT thread), a
compute node one host core (a VM-class machine), all divided by the time dilation the fleet needs,
and every time reported is board seconds (wall / dilation). This process is the aggregator: per
global epoch it sends each owner its M_1 | M_P, collects the trained ones and the nodes'
averaged middle parts, FedAvgs the ends (server/methods/mpsl.py), assembles and scores the model.
Next to each measured epoch it puts Eq. 4-6's estimate (models/mpsl_plan.py) for the same split.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.artifacts import ensure_artifacts
from models.builder import build
from models.datasets import load_dataset
from models.mpsl_plan import (
    LayerProfile,
    NodeSpec,
    Setting,
    best_split,
    check_fits,
    estimate,
    part_mem_mb,
    plan_cuts,
    stages_from_cuts,
)
from models.partition import partition
from models.split import ensure_part_artifacts, plan_parts
from models.structure import full_structure
from runtime.board import load_board
from runtime.errors import ConfigError, OrchardError, ProtocolError, TransportError
from runtime.protocol import SplitMessage
from runtime.split_link import FrameStream
from runtime.trainer import Trainer
from server.methods.mpsl import assemble, merge_ends
from testbed.broker import port_accepts
from testbed.calibrate import board_quota_cores, get_host_speed
from testbed.cgroups import host_cpu_cores
from testbed.dilation import background_cores, plan_dilation
from testbed.links import parse_link
from testbed.netns import Endpoint
from testbed.orphans import RunLedger, sweep_and_report
from testbed.shaping import RunLinks, check_links
from testbed.throttle import detect_throttle

X = "x"
MODES = ("mpsl", "fedavg")


@dataclass(frozen=True)
class RunSpec:
    mode: str  # mpsl | fedavg
    owners: int
    nodes: int = 1  # compute nodes (mpsl); 1 is one-hop parallel SL
    model: str = "cnn"
    dataset: str = "fashion-mnist"
    samples_per_owner: int = 512
    test_samples: int = 1000
    batch: int = 32
    epochs: int = 2
    lr: float = 0.05
    seed: int = 0
    owner_board: str = "rpi4b-4gb"
    head_layers: int = 2  # owners keep this many input layers (M_1) ...
    tail_layers: int = 1  # ... and this many output layers (M_P)
    node_cuts: tuple[str, ...] | None = None  # None: the DP's split
    node_mem_cap_mb: float = 1e6
    dilation: str | float = "auto"
    timeout_s: float = 300.0  # board seconds an owner waits for a compute node before it reports it lost
    kill_node_at_epoch: int = -1  # fault injection (tests): the first compute node is killed in this epoch
    owner_link: Mapping[str, Any] | None = None  # each owner's link table ({ kind = "wifi" }: testbed.links)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mpsl run: mode {self.mode!r} must be one of {', '.join(MODES)}")
        if self.owners < 1 or (self.mode == "mpsl" and self.nodes < 1):
            raise ConfigError(f"mpsl run: owners={self.owners}, nodes={self.nodes}: need at least one of each")


def _vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not port_accepts(host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise TransportError(f"{what} did not start listening on port {port} (exit {proc.poll()})")
        time.sleep(0.05)


def _joiner(group: Any, endpoint: Endpoint | None) -> Callable[[], None]:
    def join() -> None:  # in the child before exec: nothing of it runs unthrottled or unshaped
        group.add_pid(os.getpid())
        if endpoint is not None:
            endpoint.enter()

    return join


def _free_ports(host: str, n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind((host, 0))
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def run(spec: RunSpec, layers: list[LayerProfile], work: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """Run one configuration; its row of the comparison (figures in board seconds)."""
    work.mkdir(parents=True, exist_ok=True)
    train = load_dataset(spec.dataset, split="train", n=spec.owners * spec.samples_per_owner, seed=spec.seed)
    test = load_dataset(spec.dataset, split="test", n=spec.test_samples, seed=spec.seed)
    structure = full_structure(spec.model, train.input_shape, train.num_classes)
    built = build(structure)
    full_dir = ensure_artifacts(structure, "sgd", cache_dir).directory
    owner_ids = [f"own{i}" for i in range(spec.owners)]
    shards = partition(train.y, spec.owners, "iid", seed=spec.seed)
    host_speed = get_host_speed()
    q_owner = min(1.0, board_quota_cores(load_board(spec.owner_board), host_speed))  # one ORT thread
    n_nodes = spec.nodes if spec.mode == "mpsl" else 0
    dil = plan_dilation(spec.dilation, [q_owner] * spec.owners + [1.0] * n_nodes, host_cpu_cores(),
                        background_cores=background_cores(host_cpu_cores()))
    batches = -(-spec.samples_per_owner // spec.batch)
    links = ({k: parse_link(f"mpsl run owner {k}", dict(spec.owner_link), load_board(spec.owner_board))
              for k in owner_ids} if spec.owner_link else {})
    check_links(links, "mosquitto")
    up = min((x.up_mbit for x in links.values()), default=1e4)
    down = min((x.down_mbit for x in links.values()), default=1e4)
    setting = Setting(owners=spec.owners, batches=batches, owner_slowdown=1.0 / q_owner, uplink_mbit=up,
                      downlink_mbit=down)
    row: dict[str, Any] = {"config": {**asdict(spec), "owner_link": dict(spec.owner_link or {}) or None},
                           "dilation": dil.factor, "owner_quota_cores": q_owner,
                           "host_speed": host_speed.speed_factor, "link_mbit": [up, down] if links else None}
    node_specs = [NodeSpec(f"node{i + 1}", spec.node_mem_cap_mb) for i in range(n_nodes)]
    if spec.mode == "mpsl":
        middle = list(range(spec.head_layers, len(layers) - spec.tail_layers))
        stages = (stages_from_cuts(layers, spec.head_layers, spec.tail_layers, spec.node_cuts) if spec.node_cuts
                  else best_split(layers, middle, node_specs, spec.owners))
        check_fits(layers, stages, node_specs, spec.owners)
        est = estimate(layers, spec.head_layers, spec.tail_layers, stages, node_specs, setting)
        cuts = plan_cuts(layers, spec.head_layers, stages)
        dirs = [str(d) for d in ensure_part_artifacts(structure, cuts, spec.batch, cache_dir)]
        parts = plan_parts(built, cuts, structure.input_shape)
        row.update({"cuts": cuts, "stages": [[layers[j].name for j in st] for st in stages],
                    "estimate_s": {"t_all": est.t_all_s, "t_aggr": est.t_aggr_s, "t_tot": est.t_tot_s,
                                   "owner_bound": est.owner_bound_s, "pipe_full": est.pipe_full_s},
                    "part_state_mb": [part_mem_mb([layers[j] for j in st], spec.owners) for st in stages]})
    else:
        step = sum(x.bwd_s for x in layers) * setting.owner_slowdown  # each layer's train call: fwd + bwd + step
        row["estimate_s"] = {"t_tot": batches * step}
    sweep_and_report()  # what SIGKILLed runs left: their processes would skew this run's timings
    throttle = detect_throttle(prefix="orchard", run_id=f"mpsl-{os.getpid()}-{int(time.time())}")
    row["throttle"] = throttle.backend
    procs: list[subprocess.Popen[bytes]] = []
    ledger = RunLedger().open(work)  # so the next run stops our nodes and owners if we are SIGKILLed

    def spawn(name: str, cmd: list[str], group: Any, endpoint: Endpoint | None) -> subprocess.Popen[bytes]:
        ledger.add_cgroup(group)
        log = (work / f"{name}.log").open("wb")
        # A group of its own, so the sweep can stop it (and what it starts) without this process.
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_joiner(group, endpoint))
        ledger.add_process(name, proc.pid)
        procs.append(proc)
        return proc

    run_links = RunLinks(links, dil.factor).open()
    host = run_links.broker_host  # the bridge when owners are shaped (their namespaces reach it), else loopback
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, 0))
    listener.listen(64)
    agg_addr = f"{host}:{listener.getsockname()[1]}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    node_streams: list[FrameStream] = []
    node_pids: list[int] = []
    try:
        if spec.mode == "mpsl":
            ports = _free_ports(host, n_nodes)
            for i in reversed(range(n_nodes)):  # the last first: each node connects to the next one
                cmd = [sys.executable, "-m", "runtime.compute_node", "--part", dirs[i + 1], "--listen",
                       f"{host}:{ports[i]}", "--owners", ",".join(owner_ids), "--lr", str(spec.lr)]
                if i + 1 < n_nodes:
                    cmd += ["--next", f"{host}:{ports[i + 1]}"]
                group = throttle.create(f"node{i + 1}", 1.0 / dil.factor, None)
                proc = spawn(f"node{i + 1}", cmd, group, None)
                _wait_port(host, ports[i], proc, f"compute node {i + 1}")
            node_pids = [p.pid for p in reversed(procs)]
            for port in ports:
                s = FrameStream.connect(f"{host}:{port}")
                s.send(SplitMessage("hello", owner_ids[0], 0, 0, note="aggregator"))
                node_streams.append(s)
        for k, idx in zip(owner_ids, shards, strict=True):
            np.savez(work / f"{k}.npz", x=train.x[idx], y=train.y[idx])
            cfg = {"owner_id": k, "mode": spec.mode, "shard": str(work / f"{k}.npz"), "aggregator": agg_addr,
                   "batch": spec.batch, "lr": spec.lr, "seed": spec.seed, "timeout_s": spec.timeout_s * dil.factor,
                   "input_shape": list(structure.input_shape), "num_classes": structure.num_outputs,
                   "full_dir": str(full_dir)}
            if spec.mode == "mpsl":
                cfg.update({"part_dirs": [dirs[0], dirs[-1]], "first_node": f"{host}:{ports[0]}",
                            "last_node": f"{host}:{ports[-1]}",
                            "method_params": {"cuts": cuts, "batch": spec.batch, "timeout_s": spec.timeout_s}})
            (work / f"{k}.json").write_text(json.dumps(cfg))
            group = throttle.create(k, q_owner / dil.factor, None)
            spawn(k, [sys.executable, "-m", "runtime.mpsl_owner", str(work / f"{k}.json")], group,
                  run_links.endpoint(k))
        owners: dict[str, FrameStream] = {}
        listener.settimeout(120.0)
        while len(owners) < spec.owners:
            sock, peer = listener.accept()
            stream = FrameStream(sock, f"{peer[0]}:{peer[1]}")
            hello = stream.recv(60.0)
            owners[hello.device_id] = stream
        row["epochs"] = _epochs(spec, built, parts if spec.mode == "mpsl" else None, owners, node_streams,
                                full_dir, test, dil.factor, procs[:n_nodes][::-1])
        for s in owners.values():
            s.send(SplitMessage("epoch_end", owner_ids[0], spec.epochs, 0))
        row["node_peak_rss_mb"] = [_vm_hwm_mb(pid) for pid in node_pids]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        listener.close()
        if links:
            run_links.record_bytes()
            row["owner_link_bytes"] = {k: run_links.describe(k) for k in owner_ids}
        run_links.close()
        throttle.close()
        ledger.close()
    return row


def _dense(msg: SplitMessage) -> npt.NDArray[np.float32]:
    x = msg.tensors.get(X)
    if msg.split_op != "weights" or not isinstance(x, np.ndarray):
        raise ProtocolError(f"aggregator: expected weights from {msg.device_id}, got {msg.split_op} ({msg.note})")
    return x


def _epochs(spec: RunSpec, built: Any, parts: Any, owners: dict[str, FrameStream], nodes: list[FrameStream],
            full_dir: Path, test: Any, dilation: float,
            node_procs: list[subprocess.Popen[bytes]]) -> list[dict[str, Any]]:
    """The global epochs. A lost compute node fails the epoch: nothing of it is merged (the global
    model stays), and the epoch is retried with every owner training the whole model (FedAvg),
    which a Pi 4 owner can; later epochs stay FedAvg."""
    total = built.layout.total
    g = built.init.copy()  # the global model, full layout
    spans = None if parts is None else [[*parts[0].full_offsets, *parts[-1].full_offsets],
                                        *[p.full_offsets for p in parts[1:-1]]]
    scorer = Trainer(full_dir)
    rows: list[dict[str, Any]] = []
    epoch, note = 0, ""
    while epoch < spec.epochs:
        sent = g if spans is None else np.concatenate([g[a:b] for a, b in spans[0]])
        t0 = time.perf_counter()
        for s in owners.values():
            s.send(SplitMessage("weights", "own0", epoch, 0, time.time(), note=note, tensors={X: sent}))
        if epoch == spec.kill_node_at_epoch and node_procs and spans is not None:
            node_procs[0].kill()  # fault injection: the first compute node vanishes as the epoch runs
        got, counts, reports, failures = [], [], [], []
        for k, s in owners.items():
            msg = s.recv(spec.timeout_s * dilation * 2)
            if msg.split_op == "error":
                failures.append(f"{k}: {msg.note}")
                continue
            got.append(_dense(msg))
            counts.append(msg.n_batches)
            reports.append(json.loads(msg.note))
        t_owners = time.perf_counter()
        middle = [_dense(s.recv(spec.timeout_s * dilation)) for s in nodes] if not failures and spans else []
        t1 = time.perf_counter()
        if failures:
            if spans is None:
                raise OrchardError(f"epoch {epoch} failed, global model kept: {failures[0]}")
            rows.append({"epoch": epoch, "failed": failures, "fallback": "fedavg",
                         "failed_after_s": (t1 - t0) / dilation})
            spans, note = None, "fallback"
            continue  # the same epoch again, the global model untouched
        ends = merge_ends(got, counts)
        if spans is not None:
            n0 = parts[0].layout.total
            g = assemble([ends[:n0], *middle, ends[n0:]],
                         [p.full_offsets for p in (parts[0], *parts[1:-1], parts[-1])], total)
        else:
            g = ends
        score = scorer.evaluate(g, test.x, test.y)
        rows.append({"epoch": epoch, "mode": "mpsl" if spans is not None else "fedavg",
                     "epoch_s": (t1 - t0) / dilation, "owners_done_s": (t_owners - t0) / dilation,
                     "accuracy": score.accuracy, "loss": score.loss,
                     "owner_peak_rss_mb": max(r["peak_rss_mb"] for r in reports),
                     "owner_train_s": float(np.mean([r["train_s"] for r in reports])) / dilation,
                     "node_wait_s": float(np.mean([r.get("node_wait_s", 0.0) for r in reports])) / dilation})
        epoch += 1
    return rows
