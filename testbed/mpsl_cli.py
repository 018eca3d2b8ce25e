"""`orchard mpsl plan` and `orchard mpsl run` (MP-SL, methods.md §4).

    orchard mpsl plan --model cnn --dataset fashion-mnist --owners 4 --nodes 2 [--node-cuts conv3]
    orchard mpsl run campaigns/compare-mpsl.toml [--out runs/compare-mpsl]

A run file lists configurations under [[run]] (RunSpec keys, testbed/mpsl_run.py) with shared
keys under [defaults]; unknown keys are errors. The results go to <out>/results.json and a
Markdown table (<out>/table.md) with measured and estimated epoch times side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError


def add_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    m = sub.add_parser("mpsl", help="MP-SL: split plan and measured runs",
                       description="Multihop parallel split learning: plan a split, run configurations.")
    msub = m.add_subparsers(dest="mpsl_command", required=True, metavar="ACTION", parser_class=parser_class)
    p = msub.add_parser("plan", help="Eq. 4 estimate and the exact split under memory caps",
                        description="Profile every layer, split the middle over N nodes, print plan + estimate.")
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--owners", type=int, default=4, help="data owners K")
    p.add_argument("--nodes", type=int, default=2, help="compute nodes N")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=16, help="batches per owner per epoch (B)")
    p.add_argument("--local-epochs", type=int, default=1, help="r")
    p.add_argument("--head-layers", type=int, default=2, help="layers the owners keep at the input (M_1)")
    p.add_argument("--tail-layers", type=int, default=1, help="layers the owners keep at the output (M_P)")
    p.add_argument("--node-cuts", help="comma-separated layers ending each node's part (default: the DP's)")
    p.add_argument("--mem-cap-mb", type=float, default=1e6, help="memory cap of every compute node")
    p.add_argument("--owner-slowdown", type=float, default=1.0, help="owner time = host time x this")
    p.add_argument("--uplink-mbit", type=float, default=1e4)
    p.add_argument("--downlink-mbit", type=float, default=1e4)
    p.add_argument("--node-link-mbit", type=float, default=1e4)
    p.add_argument("--cache", help="artifact cache folder")
    p.add_argument("--json", help="write the plan to this JSON file")
    p.set_defaults(func=cmd_plan)
    r = msub.add_parser("run", help="run the configurations of a file, measured", description=__doc__)
    r.add_argument("file")
    r.add_argument("--out", help="run folder (default runs/<file stem>)")
    r.add_argument("--only", help="comma-separated indices of [[run]] entries to run")
    r.add_argument("--cache", help="artifact cache folder")
    r.add_argument("--no-links", action="store_true", help="ignore owner_link: every owner on loopback, uncapped")
    r.set_defaults(func=cmd_run)
    t = msub.add_parser("table", help="rebuild table.md of a run folder", description="Rebuild <folder>/table.md.")
    t.add_argument("folder")
    t.set_defaults(func=cmd_table)


def _shape(dataset: str) -> tuple[tuple[int, ...], int]:
    from models.datasets import load_dataset

    ds = load_dataset(dataset, split="test", n=10)
    return ds.input_shape, ds.num_classes


def cmd_plan(args: argparse.Namespace) -> int:
    from models.mpsl_plan import (
        NodeSpec,
        Setting,
        best_split,
        check_fits,
        describe,
        estimate,
        profile,
        stages_from_cuts,
    )
    from models.structure import full_structure

    shape, classes = _shape(args.dataset)
    structure = full_structure(args.model, shape, classes)
    layers = profile(structure, args.batch, Path(args.cache) if args.cache else None)
    if not 1 <= args.head_layers < len(layers) - args.tail_layers or args.tail_layers < 1:
        raise ConfigError(f"--head-layers {args.head_layers} / --tail-layers {args.tail_layers} leave no middle "
                          f"of {args.model}'s {len(layers)} layers ({', '.join(x.name for x in layers)})")
    nodes = [NodeSpec(f"node{i + 1}", args.mem_cap_mb) for i in range(args.nodes)]
    if args.node_cuts:
        stages = stages_from_cuts(layers, args.head_layers, args.tail_layers, args.node_cuts.split(","))
        if len(stages) != args.nodes:
            raise ConfigError(f"--node-cuts {args.node_cuts!r} makes {len(stages)} parts for {args.nodes} nodes")
        check_fits(layers, stages, nodes, args.owners)
    else:
        middle = list(range(args.head_layers, len(layers) - args.tail_layers))
        stages = best_split(layers, middle, nodes, args.owners)
    s = Setting(args.owners, args.batches, args.local_epochs, args.owner_slowdown, args.uplink_mbit,
                args.downlink_mbit, args.node_link_mbit)
    plan = describe(layers, args.head_layers, args.tail_layers, stages, nodes, s, estimate(
        layers, args.head_layers, args.tail_layers, stages, nodes, s))
    plan["layers"] = [dataclasses.asdict(x) for x in layers]
    print(f"owners keep {'+'.join(plan['owner_head'])} | {'+'.join(plan['owner_tail'])}; cuts {','.join(plan['cuts'])}")
    for n in plan["nodes"]:
        print(f"  {n['node']}: {'+'.join(n['layers'])}  {n['mem_mb']:.2f} MB of part state for {args.owners} owners")
    e = plan["estimate_s"]
    print(f"estimate (Eq. 4-6): T_all {e['t_all']:.3f} s + T_aggr {e['t_aggr']:.3f} s = {e['t_tot']:.3f} s per "
          f"epoch; pipe full {e['pipe_full']:.4f} s/batch; owner-bound {e['owner_bound']:.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=1) + "\n")
    return 0


def load_run_file(path: str | Path) -> list[Any]:
    from runtime.tomlconf import load_toml
    from testbed.mpsl_run import RunSpec

    data = load_toml(path)
    unknown = sorted(set(data) - {"defaults", "run"})
    if unknown:
        raise ConfigError(f"{path}: unknown table {unknown[0]!r}; it takes [defaults] and [[run]]")
    fields = {f.name for f in dataclasses.fields(RunSpec)}
    defaults = data.get("defaults", {})
    specs = []
    for i, raw in enumerate(data.get("run", [])):
        merged = {**defaults, **raw}
        bad = sorted(set(merged) - fields)
        if bad:
            raise ConfigError(f"{path}: [[run]] #{i} has unknown key {bad[0]!r}; keys: {', '.join(sorted(fields))}")
        if "node_cuts" in merged:
            merged["node_cuts"] = tuple(merged["node_cuts"])
        specs.append(RunSpec(**merged))
    if not specs:
        raise ConfigError(f"{path}: no [[run]] entries")
    return specs


def _table(rows: list[dict[str, Any]]) -> str:
    """Measured epoch (board s, mean ± half-range over epochs) against Eq. 4-6, and against the larger
    of Eq. 4-6 and the owner bound (Eq. 4 assumes the compute nodes, not the owners, bind)."""
    lines = ["| mode | K owners | N nodes | split (nodes) | epoch s measured | Eq. 4-6 s | error | "
             "max(Eq. 4-6, owner bound) s | error | peak RSS per node MB | part state per node MB | accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, eps = r["config"], [e for e in r.get("epochs", []) if "epoch_s" in e]
        measured = [e["epoch_s"] for e in eps]
        m = sum(measured) / len(measured) if measured else math.nan
        spread = (max(measured) - min(measured)) / 2 if measured else math.nan
        est = r["estimate_s"]["t_tot"]
        both = max(est, r["estimate_s"].get("owner_bound", est))

        def err(x: float, m: float = m) -> str:
            return f"{(x - m) / m * 100:+.1f}%" if math.isfinite(m) else "-"

        rss = r.get("node_peak_rss_mb", [])
        state = r.get("part_state_mb", [])
        lines.append(
            f"| {c['mode']} | {c['owners']} | {c['nodes'] if c['mode'] == 'mpsl' else '-'} | "
            f"{' / '.join('+'.join(s) for s in r.get('stages', [])) or '-'} | {m:.2f} ± {spread:.2f} | {est:.2f} | "
            f"{err(est)} | {both:.2f} | {err(both)} | {', '.join(f'{x:.0f}' for x in rss) or '-'} | "
            f"{', '.join(f'{x:.2f}' for x in state) or '-'} | {eps[-1]['accuracy'] if eps else math.nan:.3f} |")
    return "\n".join(lines) + "\n"


def cmd_table(args: argparse.Namespace) -> int:
    rows = json.loads((Path(args.folder) / "results.json").read_text())["rows"]
    text = _table(rows)
    (Path(args.folder) / "table.md").write_text(text)
    print(text, end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from models.mpsl_plan import profile
    from models.structure import full_structure
    from testbed.mpsl_run import run

    specs = load_run_file(args.file)
    if args.no_links:
        specs = [dataclasses.replace(s, owner_link=None) for s in specs]
    out = Path(args.out or f"runs/{Path(args.file).stem}")
    out.mkdir(parents=True, exist_ok=True)
    only = {int(i) for i in args.only.split(",")} if args.only else None
    cache = Path(args.cache) if args.cache else None
    profiles: dict[tuple[str, str, int], Any] = {}
    rows = []
    for i, spec in enumerate(specs):
        if only is not None and i not in only:
            continue
        key = (spec.model, spec.dataset, spec.batch)
        if key not in profiles:
            shape, classes = _shape(spec.dataset)
            profiles[key] = profile(full_structure(spec.model, shape, classes), spec.batch, cache)
        print(f"[{i}] {spec.mode} K={spec.owners} N={spec.nodes if spec.mode == 'mpsl' else '-'} ...", flush=True)
        row = run(spec, profiles[key], out / f"run{i}", cache)
        row["index"] = i
        rows.append(row)
        (out / "results.json").write_text(json.dumps({"rows": rows, "layers": {
            "/".join(map(str, k)): [dataclasses.asdict(x) for x in v] for k, v in profiles.items()}}, indent=1))
        print(_table([row]).splitlines()[-1], flush=True)
    (out / "table.md").write_text(_table(rows))
    print(_table(rows))
    return 0
