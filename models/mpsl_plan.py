"""`orchard mpsl plan`: MP-SL's epoch-time estimate (EdgeSys'25 Eq. 1-6, methods.md §4.5) and an
exact split of the middle layers over N compute nodes under their memory caps (§4.6).

The paper solves an ILP with Gurobi; for a chain an exact search is a dynamic programme. Its
objective, max_i fwd_i + max_i bwd_i, is a sum of two bottlenecks, so the programme fixes the
forward bottleneck F (one of the O(m^2) segment sums), finds the least backward bottleneck with
every forward stage <= F, and keeps the best F + B. Checked against brute force in the tests.

Per-layer times come from profiling each layer as its own split part on this host (`profile`):
forward = the part's eval call; backward = its train call, which in ORT reruns the forward
(runtime/split.py), so the estimate uses what the nodes really spend. Memory of a part on a node
= K x (its weights + one stashed input batch): a copy and one batch in flight per owner.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.builder import build
from models.split import activation_nbytes, ensure_part_artifacts, layers_of
from models.structure import Structure
from runtime.errors import ConfigError
from runtime.split import PartRunner

MB = 1024 * 1024


@dataclass(frozen=True)
class LayerProfile:
    name: str
    fwd_s: float  # one batch, on the profiling host, one thread (CPU seconds)
    bwd_s: float  # the train call: recomputed forward + backward + SGD step
    in_bytes: int  # one batch of its input
    out_bytes: int  # one batch of its output
    param_bytes: int


@dataclass(frozen=True)
class NodeSpec:
    name: str
    mem_cap_mb: float
    speed: float = 1.0  # relative to the profiling host: a stage takes host time / speed


@dataclass(frozen=True)
class Setting:
    owners: int  # K
    batches: int  # B, per owner per epoch
    local_epochs: int = 1  # r
    owner_slowdown: float = 1.0  # an owner's M_1 / M_P take host time x this
    uplink_mbit: float = 1e4  # owner -> first node
    downlink_mbit: float = 1e4  # node -> owner
    node_link_mbit: float = 1e4  # between compute nodes


@dataclass(frozen=True)
class Estimate:
    t_all_s: float  # Eq. 4
    t_aggr_s: float  # Eq. 5
    start_s: float
    end_s: float
    pipe_full_s: float  # Eq. 3, per batch once the pipe is full
    pipe_empty_s: float
    owner_bound_s: float  # r·B x one owner's own cycle: Eq. 4 assumes the nodes, not the owners, bind

    @property
    def t_tot_s(self) -> float:  # Eq. 6
        return self.t_all_s + self.t_aggr_s


def profile(structure: Structure, batch: int, cache_dir: Path | None = None, repeats: int = 5,
            threads: int = 1) -> list[LayerProfile]:
    """Time every layer as a split part of its own, in CPU seconds of one thread (median of
    `repeats` after one warm-up)."""
    built = build(structure)
    layers = layers_of(built)
    dirs = ensure_part_artifacts(structure, [layer.name for layer in layers[:-1]], batch, cache_dir)
    rng = np.random.default_rng(0)
    out, in_shape = [], structure.input_shape
    for layer, d in zip(layers, dirs, strict=True):
        r = PartRunner(d, threads)
        r.set_lr(1e-6)
        x = rng.normal(size=(batch, *r.in_shape)).astype(np.float32)
        g = rng.normal(size=(batch, *r.out_shape)).astype(np.float32) * 1e-3
        y = rng.integers(0, structure.num_outputs, batch)
        fwd, bwd = [], []
        for i in range(repeats + 1):
            # CPU time of this thread (ORT runs one intra-op thread on the caller's): wall time on
            # a shared host moves with other tenants' load, CPU time does not (as testbed.calibrate).
            t0 = time.thread_time()
            r.forward(x)
            t1 = time.thread_time()
            if r.last:
                r.train_last(x, y)
            else:
                r.backward(x, g)
            t2 = time.thread_time()
            if i:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
        out.append(LayerProfile(layer.name, statistics.median(fwd), statistics.median(bwd),
                                activation_nbytes(in_shape, batch), activation_nbytes(layer.out_shape, batch),
                                4 * r.weights_total))
        in_shape = layer.out_shape
    return out


def part_mem_mb(layers: Sequence[LayerProfile], owners: int) -> float:
    return owners * (sum(layer.param_bytes for layer in layers) + layers[0].in_bytes) / MB


def _mbit_s(nbytes: float, mbit: float) -> float:
    return nbytes * 8 / (mbit * 1e6)


def estimate(layers: Sequence[LayerProfile], head: int, tail: int, stages: Sequence[Sequence[int]],
             nodes: Sequence[NodeSpec], s: Setting) -> Estimate:
    """Eq. 1-6 for owners holding the first `head` and last `tail` layers, and compute node i the
    layer indices `stages[i]`."""
    fwd = [sum(layers[j].fwd_s for j in st) / n.speed for st, n in zip(stages, nodes, strict=True)]
    bwd = [sum(layers[j].bwd_s for j in st) / n.speed for st, n in zip(stages, nodes, strict=True)]
    # Activations between compute nodes cross a link too; the paper's stages are processing only.
    hops = [_mbit_s(layers[st[-1]].out_bytes, s.node_link_mbit) for st in stages[:-1]]
    pipe_full = max(fwd) + max(bwd)  # Eq. 1-3
    pipe_empty = sum(fwd) + sum(bwd) + 2 * sum(hops)
    h, t = layers[:head], layers[len(layers) - tail:]
    act_up, act_back = h[-1].out_bytes, t[0].in_bytes  # owner -> first node, last node -> owner
    head_fwd = sum(x.fwd_s for x in h) * s.owner_slowdown
    head_bwd = sum(x.bwd_s for x in h) * s.owner_slowdown
    tail_train = sum(x.bwd_s for x in t) * s.owner_slowdown
    start = head_fwd + _mbit_s(act_up, s.uplink_mbit)
    end = _mbit_s(act_up, s.downlink_mbit) + head_bwd
    n_batches = s.local_epochs * s.batches * s.owners
    t_all = start + pipe_empty + (n_batches - 1) * pipe_full + end  # Eq. 4
    owner_cycle = (head_fwd + head_bwd + tail_train + _mbit_s(act_up, s.uplink_mbit)
                   + _mbit_s(act_back, s.downlink_mbit) + _mbit_s(act_back, s.uplink_mbit)
                   + _mbit_s(act_up, s.downlink_mbit) + pipe_empty)
    ends_bytes = sum(x.param_bytes for x in (*h, *t))
    t_aggr = _mbit_s(ends_bytes, s.uplink_mbit) + s.owners * _mbit_s(ends_bytes, s.downlink_mbit)  # Eq. 5
    return Estimate(t_all, t_aggr, start, end, pipe_full, pipe_empty, s.local_epochs * s.batches * owner_cycle)


def check_fits(layers: Sequence[LayerProfile], stages: Sequence[Sequence[int]], nodes: Sequence[NodeSpec],
               owners: int) -> None:
    """ConfigError naming the first part over its node's memory cap."""
    for st, n in zip(stages, nodes, strict=True):
        need = part_mem_mb([layers[j] for j in st], owners)
        if need > n.mem_cap_mb:
            names = ",".join(layers[j].name for j in st)
            raise ConfigError(f"part ({names}) needs {need:.1f} MB for {owners} owners on compute node {n.name}, "
                              f"over its memory cap of {n.mem_cap_mb:g} MB")


def best_split(layers: Sequence[LayerProfile], middle: Sequence[int], nodes: Sequence[NodeSpec],
               owners: int) -> list[list[int]]:
    """The contiguous split of `middle` over `nodes` (in chain order, each at least one layer,
    each within its memory cap) minimising max_i fwd_i + max_i bwd_i; exact."""
    m, n = len(middle), len(nodes)
    if n < 1 or m < n:
        raise ConfigError(f"{m} middle layers cannot be split over {n} compute nodes (each needs one)")
    pf = np.concatenate([[0.0], np.cumsum([layers[j].fwd_s for j in middle])])
    pb = np.concatenate([[0.0], np.cumsum([layers[j].bwd_s for j in middle])])

    def fits(i: int, a: int, b: int) -> bool:
        return part_mem_mb([layers[j] for j in middle[a:b]], owners) <= nodes[i].mem_cap_mb

    candidates = sorted({(pf[b] - pf[a]) / nodes[i].speed
                         for i in range(n) for a in range(m) for b in range(a + 1, m + 1)})
    best: tuple[float, list[list[int]]] | None = None
    for cap_f in candidates:
        if best is not None and cap_f >= best[0]:
            break
        # dp[i][b]: least max-backward placing middle[:b] on nodes[:i+1]; back[i][b]: where node i starts
        dp = np.full((n, m + 1), math.inf)
        back = np.zeros((n, m + 1), dtype=int)
        for i in range(n):
            for b in range(i + 1, m - (n - 1 - i) + 1):
                for a in range(i, b):
                    if (pf[b] - pf[a]) / nodes[i].speed > cap_f + 1e-15 or not fits(i, a, b):
                        continue
                    prev = 0.0 if i == 0 else dp[i - 1][a]
                    if i == 0 and a != 0:
                        continue
                    val = max(prev, (pb[b] - pb[a]) / nodes[i].speed)
                    if val < dp[i][b]:
                        dp[i][b], back[i][b] = val, a
        if math.isfinite(dp[n - 1][m]) and (best is None or cap_f + dp[n - 1][m] < best[0]):
            stages, b = [], m
            for i in range(n - 1, -1, -1):
                a = int(back[i][b])
                stages.append(list(middle[a:b]))
                b = a
            best = (cap_f + float(dp[n - 1][m]), stages[::-1])
    if best is None:
        raise ConfigError(f"no split of the middle layers ({', '.join(layers[j].name for j in middle)}) over "
                          f"{n} compute nodes fits their memory caps "
                          f"({', '.join(f'{x.name}={x.mem_cap_mb:g} MB' for x in nodes)}) for {owners} owners")
    return best[1]


def brute_force_split(layers: Sequence[LayerProfile], middle: Sequence[int], nodes: Sequence[NodeSpec],
                      owners: int) -> tuple[float, list[list[int]]] | None:
    """Every contiguous split, for the tests (and small cases)."""
    m, n = len(middle), len(nodes)
    best = None
    for cuts in itertools.combinations(range(1, m), n - 1):
        edges = [0, *cuts, m]
        stages = [list(middle[edges[i]:edges[i + 1]]) for i in range(n)]
        pairs = list(zip(stages, nodes, strict=True))
        if any(part_mem_mb([layers[j] for j in st], owners) > x.mem_cap_mb for st, x in pairs):
            continue
        f = max(sum(layers[j].fwd_s for j in st) / x.speed for st, x in zip(stages, nodes, strict=True))
        b = max(sum(layers[j].bwd_s for j in st) / x.speed for st, x in zip(stages, nodes, strict=True))
        if best is None or f + b < best[0]:
            best = (f + b, stages)
    return best


def stages_from_cuts(layers: Sequence[LayerProfile], head: int, tail: int, cuts: Sequence[str]) -> list[list[int]]:
    """Given cut points inside the middle (layer names ending a node's part), the node stages."""
    names = [x.name for x in layers]
    middle = list(range(head, len(layers) - tail))
    bounds = []
    for c in cuts:
        if c not in names or names.index(c) not in middle[:-1]:
            raise ConfigError(f"cut point {c!r} is not a middle layer that can end a node's part; "
                              f"choose among {', '.join(names[j] for j in middle[:-1])}")
        bounds.append(names.index(c) + 1)
    if bounds != sorted(set(bounds)):
        raise ConfigError(f"cut points {list(cuts)} must be distinct and in model order")
    edges = [head, *bounds, len(layers) - tail]
    return [list(range(edges[i], edges[i + 1])) for i in range(len(edges) - 1)]


def plan_cuts(layers: Sequence[LayerProfile], head: int, stages: Sequence[Sequence[int]]) -> list[str]:
    """The full model's cut points (runtime split parts) for owners' head and the node stages."""
    return [layers[head - 1].name, *[layers[st[-1]].name for st in stages]]


def describe(layers: Sequence[LayerProfile], head: int, tail: int, stages: Sequence[Sequence[int]],
             nodes: Sequence[NodeSpec], s: Setting, est: Estimate) -> dict[str, Any]:
    return {
        "owner_head": [x.name for x in layers[:head]], "owner_tail": [x.name for x in layers[len(layers) - tail:]],
        "nodes": [{"node": n.name, "layers": [layers[j].name for j in st],
                   "mem_mb": round(part_mem_mb([layers[j] for j in st], s.owners), 3), "mem_cap_mb": n.mem_cap_mb}
                  for st, n in zip(stages, nodes, strict=True)],
        "cuts": plan_cuts(layers, head, stages),
        "owners": s.owners, "batches": s.batches, "local_epochs": s.local_epochs,
        "estimate_s": {"t_all": est.t_all_s, "t_aggr": est.t_aggr_s, "t_tot": est.t_tot_s,
                       "pipe_full": est.pipe_full_s, "pipe_empty": est.pipe_empty_s, "start": est.start_s,
                       "end": est.end_s, "owner_bound": est.owner_bound_s},
    }
