"""`orchard dse`: DISTREAL's design-space exploration (methods.md §2.3), an NSGA-II search over
per-layer dropout vectors on a discrete grid, for one model and one board.

Objective 1 (minimise): board milliseconds per mini-batch. Each vector is timed on this host
through the device trainer as a device runs it (ONNX Runtime, one thread, a fresh filter subset
every batch, so the copy in and the scatter back are in the figure), in CPU time (wall time moves
with other load), and scaled to the board by the testbed's own emulation factor:
`board_ms = host_cpu_ms × host_speed / (board speed × board cores)` (testbed/calibrate.py).
Objective 2 (maximise): accuracy on a held-out proxy split after training from the same start
for a fixed board-time budget, i.e. `floor(budget / board_ms)` steps; a vector that diverges
scores 0. Steps from measured time, not a wall clock: the score does not move with host load.

NSGA-II (Deb et al. 2002): non-dominated sorting, crowding distance, binary tournaments, uniform
crossover, a ±1 grid-step mutation per gene with probability 1/L. The uniform vectors d = c·1 are
always in the first population (anchors). The written front is the non-dominated set of every
vector evaluated; `--time-budget` stops the search between evaluations.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.artifacts import artifacts_for, default_cache_dir
from models.builder import build
from models.datasets import load_dataset, train_test_split
from models.structure import BASE_CHANNELS, MODELS, full_structure, sub_structure
from runtime.board import load_board
from runtime.errors import ConfigError, TrainerError
from runtime.methods import distreal as dm
from runtime.methods import spec
from runtime.ort import OrtSession
from runtime.profile import parse_profile
from runtime.protocol import Assignment
from runtime.submodel import index_map_for
from runtime.trainer import TrainConfig, Trainer

# The channel groups filter dropout thins: conv filters (the paper's), the MLP's hidden units;
# ResNet's inner block channels only (a stage's channels are shared by its residual sum).
DROPPABLE: dict[str, tuple[str, ...]] = {"mlp": ("fc1", "fc2"), "lenet": ("conv1", "conv2"),
                                         "cnn": ("conv1", "conv2", "conv3", "conv4"), "resnet": ("b1", "b2", "b3")}
GRID = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)  # methods.md §2.2 [INTERP]

Genome = tuple[int, ...]  # grid indices, one per droppable group


@dataclass(frozen=True)
class DseConfig:
    model: str = "cnn"
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    board: str = "rpi4b-4gb"
    samples: int = 3000  # stratified proxy subset (train + held-out)
    batch_size: int = 32
    lr: float = 0.05
    budget_board_s: float = 30.0  # objective 2: board seconds of training per candidate
    max_steps: int = 400  # cap on a candidate's steps (the cheapest vectors would take many)
    timing_steps: int = 20  # timed steps per vector for objective 1 (the first two are warm-up)
    population: int = 10
    generations: int = 4
    time_budget_s: float = 0.0  # wall seconds for the whole search; 0: no limit
    seed: int = 0
    grid: tuple[float, ...] = GRID
    host_speed: float | None = None  # pin the host speed (else the calibration's cached figure)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"dse: unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        for r in self.grid:
            if not 0.0 <= r < 1.0:
                raise ConfigError(f"dse: grid rate {r!r} is outside [0, 1)")
        if 0.0 not in self.grid:
            raise ConfigError(f"dse: the grid {list(self.grid)} must hold 0 (the dense anchor)")
        for name in ("population", "generations", "timing_steps", "max_steps", "samples", "batch_size"):
            if getattr(self, name) < (3 if name == "timing_steps" else 1):
                raise ConfigError(f"dse: {name} {getattr(self, name)!r} is too small")
        if not self.budget_board_s > 0 or self.time_budget_s < 0:
            raise ConfigError(f"dse: budget_board_s {self.budget_board_s!r} must be > 0, time_budget_s >= 0")


@dataclass
class Candidate:
    drop: dict[str, float]
    step_ms: float  # board ms per mini-batch
    host_step_ms: float  # host CPU ms per mini-batch, one thread
    score: float  # proxy accuracy after the board-time budget
    flops_ratio: float  # forward FLOPs of the thinned graph / the full one
    steps: int
    anchor: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(step_ms, score): a is no slower and no worse, and better in one."""
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def non_dominated_sort(points: Sequence[tuple[float, float]]) -> list[list[int]]:
    """Fronts of indices, best first (NSGA-II's fast non-dominated sort)."""
    n = len(points)
    beats: list[list[int]] = [[] for _ in range(n)]
    beaten = [0] * n
    for i in range(n):
        for j in range(n):
            if i != j and dominates(points[i], points[j]):
                beats[i].append(j)
            elif i != j and dominates(points[j], points[i]):
                beaten[i] += 1
    fronts, current = [], [i for i in range(n) if beaten[i] == 0]
    while current:
        fronts.append(current)
        nxt = []
        for i in current:
            for j in beats[i]:
                beaten[j] -= 1
                if beaten[j] == 0:
                    nxt.append(j)
        current = nxt
    return fronts


def crowding(points: Sequence[tuple[float, float]], front: Sequence[int]) -> dict[int, float]:
    dist = dict.fromkeys(front, 0.0)
    for k in range(2):
        ordered = sorted(front, key=lambda i: points[i][k])
        lo, hi = points[ordered[0]][k], points[ordered[-1]][k]
        dist[ordered[0]] = dist[ordered[-1]] = math.inf
        if hi > lo:
            for a, b, c in zip(ordered, ordered[1:], ordered[2:], strict=False):
                dist[b] += (points[c][k] - points[a][k]) / (hi - lo)
    return dist


def select(points: Sequence[tuple[float, float]], n: int) -> list[int]:
    """NSGA-II environmental selection: whole fronts, then the least crowded of the next."""
    chosen: list[int] = []
    for front in non_dominated_sort(points):
        if len(chosen) + len(front) <= n:
            chosen += front
            continue
        dist = crowding(points, front)
        chosen += sorted(front, key=lambda i: -dist[i])[: n - len(chosen)]
        break
    return chosen


def offspring(parents: Sequence[Genome], ranks: dict[Genome, tuple[int, float]], n: int, levels: int,
              rng: np.random.Generator) -> list[Genome]:
    """Binary tournaments on (rank, −crowding), uniform crossover, ±1-step mutation at 1/L."""

    def pick() -> Genome:
        a, b = (parents[int(i)] for i in rng.integers(len(parents), size=2))
        return a if ranks[a] <= ranks[b] else b

    out = []
    for _ in range(n):
        p, q = pick(), pick()
        child = [p[i] if rng.random() < 0.5 else q[i] for i in range(len(p))]
        for i in range(len(child)):
            if rng.random() < 1.0 / len(child):
                child[i] = int(np.clip(child[i] + (1 if rng.random() < 0.5 else -1), 0, levels - 1))
        out.append(tuple(child))
    return out


class Evaluator:
    """Times and scores vectors for one model, board and proxy split; caches by vector."""

    def __init__(self, cfg: DseConfig, cache_dir: Path | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.cfg, self.cache_dir, self.log = cfg, cache_dir, log
        ds = load_dataset(cfg.dataset, cfg.data_root, seed=cfg.seed, n=cfg.samples)
        self.train, self.held_out = train_test_split(ds, 0.25, seed=cfg.seed)
        self.input_shape, self.num_classes = ds.input_shape, ds.num_classes
        self.full = full_structure(cfg.model, ds.input_shape, ds.num_classes)
        built = build(self.full, seed=cfg.seed)
        self.init, self.full_flops = built.init, built.flops_per_sample
        self.groups = {g: BASE_CHANNELS[cfg.model][g] for g in DROPPABLE[cfg.model]}
        from testbed.calibrate import get_host_speed  # the emulation's own host figure

        board = load_board(cfg.board)
        self.host_speed = get_host_speed(pinned=cfg.host_speed).speed_factor
        self.to_board = self.host_speed / (board.speed_factor * board.cores)
        self.results: dict[Genome, Candidate] = {}

    def drop_of(self, genome: Genome) -> dict[str, float]:
        return {g: self.cfg.grid[i] for g, i in zip(self.groups, genome, strict=True) if self.cfg.grid[i] > 0}

    def front_doc(self, candidates: Sequence[Candidate]) -> dict[str, Any]:
        return {"format": dm.FRONT_FORMAT, "model": self.cfg.model, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "groups": self.groups, "board": self.cfg.board,
                "batch_size": self.cfg.batch_size,
                "vectors": [{"drop": c.drop, "step_ms": c.step_ms, "score": c.score} for c in candidates]}

    def _device(self, drop: dict[str, float], threads: int = 1) -> tuple[dm.Device, Trainer]:
        params = spec("distreal").params({"front": self.front_doc([Candidate(drop, 1.0, 1.0, 0.0, 1.0, 0)]),
                                          "uniform_rate": -1})
        texts = spec("distreal").artifact_profiles("dense", params)
        sets = artifacts_for(self.cfg.model, self.input_shape, self.num_classes, texts, cache_dir=self.cache_dir)
        sessions = {t: OrtSession(sets[t].directory, threads=threads) for t in texts}
        assignment = Assignment("distreal", "dense", texts, spec("distreal").extras("dense", params))
        method = dm.Device(assignment, sessions.__getitem__, quota_cores=lambda: None)
        return method, Trainer.on_backend(method.primary, self.input_shape, self.num_classes)

    def evaluate(self, genome: Genome, anchor: bool = False) -> Candidate:
        if genome in self.results:
            return self.results[genome]
        cfg, drop = self.cfg, self.drop_of(genome)
        method, trainer = self._device(drop)
        timing = TrainConfig(steps=cfg.timing_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
        cpu_ms: list[float] = []
        last = [time.process_time()]

        original = method.before_step

        def timed(step: int, feeds: Any) -> Any:
            now = time.process_time()
            if step >= 2:  # the first steps pay ORT's warm-up
                cpu_ms.append((now - last[0]) * 1e3)
            last[0] = now
            return original(step, feeds)

        method.before_step = timed  # type: ignore[method-assign]
        with contextlib.suppress(TrainerError):  # a diverging vector is still timed; its score says the rest
            trainer.train(self.init, self.train.x, self.train.y, timing, method=method)
        host_ms = float(np.median(cpu_ms)) if cpu_ms else math.inf
        step_ms = host_ms * self.to_board
        steps = max(1, min(cfg.max_steps, int(cfg.budget_board_s * 1e3 // step_ms)))
        method, trainer = self._device(drop)
        run = TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
        try:
            result = trainer.train(self.init, self.train.x, self.train.y, run, method=method)
            score = trainer.evaluate(result.weights, self.held_out.x, self.held_out.y).accuracy
        except TrainerError:
            score = 0.0
        structural = parse_profile(dm.vector_profile(drop))
        flops = build(sub_structure(self.full, index_map_for(structural, self.full.channels))).flops_per_sample
        cand = Candidate(drop, round(step_ms, 3), round(host_ms, 3), round(score, 4),
                         round(flops / self.full_flops, 4), steps, anchor)
        self.results[genome] = cand
        self.log(f"  {dm.vector_profile(drop):45s} board {step_ms:8.1f} ms/batch  host {host_ms:6.1f} ms  "
                 f"FLOPs {cand.flops_ratio:.2f}  {steps:4d} steps  acc {score:.3f}")
        return cand


def pareto_front(candidates: Sequence[Candidate], num_classes: int) -> list[Candidate]:
    """The non-dominated candidates, cheapest first, among those that learned at all: a vector
    that diverged (score 0) or stayed at chance would otherwise sit on the front as the cheapest
    point, and a device short of time would pick it and train nothing (or NaNs)."""
    learned = [c for c in candidates if c.score > 1.0 / num_classes + 0.05]
    if not learned:
        raise ConfigError(f"dse: none of the {len(candidates)} vectors learned above chance; "
                          "lower the learning rate or raise the budget")
    pts = [(c.step_ms, c.score) for c in learned]
    return sorted((learned[i] for i in non_dominated_sort(pts)[0]), key=lambda c: c.step_ms)


def search(cfg: DseConfig, cache_dir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the search; returns the Pareto document (what `write_front` stores)."""
    started = time.monotonic()
    ev = Evaluator(cfg, cache_dir, log)
    levels, n_genes = len(cfg.grid), len(ev.groups)
    rng = np.random.default_rng(cfg.seed)
    anchors = [tuple([i] * n_genes) for i in range(levels)]
    population = list(dict.fromkeys(anchors))
    while len(population) < cfg.population:
        population.append(tuple(int(v) for v in rng.integers(levels, size=n_genes)))
    log(f"dse {cfg.model} on {cfg.board}: host speed {ev.host_speed:.2f}, board ms = host CPU ms x "
        f"{ev.to_board:.3f}; {len(population)} x {cfg.generations} generations, budget {cfg.budget_board_s:g} board s")
    out_of_time = False

    def over() -> bool:
        return cfg.time_budget_s > 0 and time.monotonic() - started > cfg.time_budget_s

    for g in population:
        if over() and len(ev.results) >= 2:
            out_of_time = True
            break
        ev.evaluate(g, anchor=g in anchors)
    population = [g for g in population if g in ev.results]
    for gen in range(cfg.generations):
        if out_of_time:
            break
        pts = [(ev.results[g].step_ms, ev.results[g].score) for g in population]
        ranks: dict[Genome, tuple[int, float]] = {}
        for r, front in enumerate(non_dominated_sort(pts)):
            for i, d in crowding(pts, front).items():
                ranks[population[i]] = (r, -d)
        children = [c for c in offspring(population, ranks, cfg.population, levels, rng) if c not in ev.results]
        log(f"generation {gen + 1}/{cfg.generations}: {len(dict.fromkeys(children))} new vectors")
        for child in dict.fromkeys(children):
            if over():
                out_of_time = True
                break
            ev.evaluate(child)
        union = list(dict.fromkeys(population + [c for c in children if c in ev.results]))
        pts = [(ev.results[g].step_ms, ev.results[g].score) for g in union]
        population = [union[i] for i in select(pts, cfg.population)]
    everything = list(ev.results.values())
    kept = pareto_front(everything, ev.num_classes)
    doc = ev.front_doc(kept)
    for v, c in zip(doc["vectors"], kept, strict=True):
        v.update(host_step_ms=c.host_step_ms, flops_ratio=c.flops_ratio, steps=c.steps, anchor=c.anchor)
    doc["evaluated"] = [asdict(c) for c in everything]
    doc["search"] = {**{k: v for k, v in asdict(cfg).items() if k != "grid"}, "grid": list(cfg.grid),
                     "host_speed": ev.host_speed, "to_board": ev.to_board,
                     "wall_s": round(time.monotonic() - started, 1), "stopped_by_time_budget": out_of_time}
    return doc


def front_path(model: str, board: str, cache_dir: Path | None = None) -> Path:
    """Where a front is stored with the artifacts: next to the cache, by model and board."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root.parent / "pareto" / f"{model}-{board}.json"


def write_front(doc: dict[str, Any], out_dir: Path, cache_dir: Path | None = None) -> list[Path]:
    dm.check_front(doc, "dse result")  # what a campaign will read back
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1)
    paths = [out_dir / "front.json", front_path(doc["model"], doc["board"], cache_dir)]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    paths.append(plot_front(doc, out_dir / "front.png"))
    return paths


def plot_front(doc: dict[str, Any], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    every = doc.get("evaluated", [])
    ax.scatter([c["step_ms"] for c in every], [c["score"] for c in every], s=14, c="0.6", label="evaluated")
    front = doc["vectors"]
    ax.plot([v["step_ms"] for v in front], [v["score"] for v in front], "o-", c="C3", label="Pareto front")
    for v in front:
        ax.annotate(dm.vector_profile(v["drop"]).replace("drop=", ""), (v["step_ms"], v["score"]), fontsize=6)
    ax.set_xlabel(f"board ms per mini-batch ({doc['board']}, batch {doc['batch_size']})")
    ax.set_ylabel("proxy accuracy after the time budget")
    ax.set_title(f"DISTREAL design space: {doc['model']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def add_dse_parser(sub: Any) -> None:
    """`orchard dse` (testbed/cli.py registers it)."""
    d = sub.add_parser("dse", help="DISTREAL design-space search: a Pareto front of dropout vectors",
                       description="NSGA-II over per-layer filter-dropout vectors: board ms per mini-batch "
                                   "against proxy accuracy after a fixed board-time budget.")
    d.add_argument("--model", default="cnn", choices=MODELS)
    d.add_argument("--dataset", default="fashion-mnist")
    d.add_argument("--data-root")
    d.add_argument("--board", default="rpi4b-4gb", help="board config the step times are scaled to")
    d.add_argument("--samples", type=int, default=3000, help="proxy split size (train + held out)")
    d.add_argument("--budget-board-s", type=float, default=30.0, help="board seconds of training per candidate")
    d.add_argument("--max-steps", type=int, default=400)
    d.add_argument("--population", type=int, default=10)
    d.add_argument("--generations", type=int, default=4)
    d.add_argument("--time-budget", type=float, default=0.0, help="wall seconds for the whole search (0: none)")
    d.add_argument("--lr", type=float, default=0.05)
    d.add_argument("--batch", type=int, default=32)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--host-speed", type=float, help="pin the host speed factor (default: the calibration's)")
    d.add_argument("--cache", help="artifact cache folder (default: $ORCHARD_CACHE or ~/.cache/orchard)")
    d.add_argument("--out", required=True, help="run folder: front.json and front.png go here")
    d.set_defaults(func=cmd_dse)


def cmd_dse(args: Any) -> int:
    cfg = DseConfig(model=args.model, dataset=args.dataset, data_root=args.data_root, board=args.board,
                    samples=args.samples, batch_size=args.batch, lr=args.lr, budget_board_s=args.budget_board_s,
                    max_steps=args.max_steps, population=args.population, generations=args.generations,
                    time_budget_s=args.time_budget, seed=args.seed, host_speed=args.host_speed)
    cache = Path(args.cache) if args.cache else None
    doc = search(cfg, cache, log=lambda line: print(line, flush=True))
    for path in write_front(doc, Path(args.out), cache):
        print(path)
    return 0
