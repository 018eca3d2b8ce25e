"""`orchard campaign run | sweep | compare`, `report` and `simulate`: the commands that run and read
testbed campaigns (testbed/cli.py registers them)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError


def _runner(campaign: Any, out: Path, args: argparse.Namespace) -> Any:
    """The single-host launcher, or with [cluster] the Ray one (only then is Ray imported)."""
    from testbed.runner import CampaignRunner

    runner: type[CampaignRunner] = CampaignRunner
    if campaign.cluster is not None:
        from testbed.cluster import ClusterRunner

        runner = ClusterRunner
    return runner(campaign, out, force=args.force, no_throttle=args.no_throttle, quiet=args.quiet, broker=args.broker)


def _sweep_runner(args: argparse.Namespace) -> Callable[[Any, Path], dict[str, Any]]:
    def run(campaign: Any, out: Path) -> dict[str, Any]:
        runner = _runner(campaign, out, args)
        summary: dict[str, Any] = runner.execute()
        if runner.stop_reason and runner.stop_reason.startswith("interrupted"):
            raise KeyboardInterrupt  # the runner cleaned up and reported; the sweep stops too
        return summary

    return run


def _run_plan(plan: Any, out: Path, args: argparse.Namespace) -> int:
    from testbed.sweep import check_out, run_sweep, table_from_runs

    if getattr(args, "table_only", False):
        records = table_from_runs(plan, out)
    else:
        check_out(plan, out, args.force)
        records = run_sweep(plan, out, run=_sweep_runner(args))
    print((out / "sweep.md").read_text())
    print(f"table: {out / 'sweep.md'}  plot: {out / 'sweep_accuracy.png'}  page: {out / 'sweep.html'}")
    failed = [r for r in records if r.error]
    for r in failed:
        print(f"error: {r.variant or 'campaign'} seed {r.seed}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def cmd_campaign_sweep(args: argparse.Namespace) -> int:
    from testbed.sweep import load_sweep, parse_seeds

    plan = load_sweep(args.sweep, seeds=parse_seeds(args.seeds) if args.seeds else None)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",")]
        unknown = sorted(set(wanted) - {v.name for v in plan.variants})
        if unknown:
            raise ConfigError(f"--variants: no variant {unknown[0]!r}; the file has "
                               f"{', '.join(v.name for v in plan.variants)}")
        plan = dataclasses.replace(plan, variants=tuple(v for v in plan.variants if v.name in wanted))
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{Path(args.sweep).stem}"
    return _run_plan(plan, out, args)


def cmd_campaign_run(args: argparse.Namespace) -> int:
    from runtime.tomlconf import load_toml
    from testbed.campaign import load_campaign

    if "sweep" in load_toml(Path(args.campaign)):
        raise ConfigError(f"{args.campaign} is a sweep file ([sweep] table): run it with "
                           f"`orchard campaign sweep {args.campaign}`")
    if args.seeds:
        from testbed.sweep import parse_seeds, single_plan

        plan = single_plan(args.campaign, parse_seeds(args.seeds))
        out = Path(args.out) if args.out else Path("runs") / f"{load_campaign(args.campaign).name}-seeds"
        return _run_plan(plan, out, args)
    campaign = load_campaign(args.campaign)
    out = Path(args.out) if args.out else Path("runs") / campaign.name
    runner = _runner(campaign, out, args)
    summary = runner.execute()
    keys = ("campaign", "strategy", "duration_board_s", "rounds", "final_accuracy", "best_accuracy", "time_to_target_s",
            "updates_accepted", "updates_rejected", "utilization")
    print("  ".join(f"{k}={fmt_value(summary.get(k))}" for k in keys))
    print(f"stopped: {runner.stop_reason}\nreport: {out / 'report.html'}")
    if runner.stop_reason and runner.stop_reason.startswith("interrupted"):
        return 130
    failure = runner.failure()
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from testbed.campaign import load_campaign
    from testbed.simulate import run_simulation

    campaign = load_campaign(args.campaign)
    out = Path(args.out) if args.out else Path("runs") / f"{campaign.name}-sim"
    result = run_simulation(campaign, args.clients, args.per_round, args.rounds or campaign.rounds or 50,
                            engine=args.engine, workers=args.workers, target_accuracy=args.target_accuracy,
                            eval_every=args.eval_every, eval_samples=args.eval_samples, out=out)
    print("  ".join(f"{k}={fmt_value(v)}" for k, v in result.summary.items()))
    print(f"curve: {out / 'simulation.json'}")
    return 0


def cmd_campaign_compare(args: argparse.Namespace) -> int:
    from testbed.compare import compare_runs

    out = Path(args.out)
    compare_runs([Path(r) for r in args.runs], out)
    print((out / "compare.md").read_text())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from testbed.report import write_report

    summary = write_report(Path(args.run))
    print(json.dumps(summary, indent=1))
    return 0


def fmt_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _add_runner_options(p: argparse.ArgumentParser) -> None:
    """What `campaign run` and `campaign sweep` hand the campaign runner (see _runner)."""
    p.add_argument("--broker", help="override [broker]: amqtt | mosquitto | mqtt://host:port")
    p.add_argument("--force", action="store_true", help="replace existing run folders")
    p.add_argument("--no-throttle", action="store_true", help="run without cgroups (reports say so)")
    p.add_argument("--quiet", action="store_true", help="no live view; one line per new version")


def add_campaign_commands(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("campaign", help="testbed campaigns of emulated boards",
                       description="Run and compare testbed campaigns.")
    csub = c.add_subparsers(dest="campaign_command", required=True, metavar="ACTION", parser_class=parser_class)
    cr = csub.add_parser("run", help="run a campaign file", description="Run a campaign of emulated boards.")
    cr.add_argument("campaign", help="campaign TOML, e.g. campaigns/default.toml")
    cr.add_argument("--out", help="run folder (default: runs/<campaign name>)")
    _add_runner_options(cr)
    cr.add_argument("--seeds", help="run once per seed (e.g. 0,1,2) into OUT/seed-<s>/ (default OUT: "
                                    "runs/<name>-seeds), then write mean ± band curves and a table of means "
                                    "with spreads (OUT/sweep.md)")
    cr.set_defaults(func=cmd_campaign_run)
    cs = csub.add_parser("sweep", help="one fleet under several methods/strategies and seeds, one table",
                         description="Run every [[sweep.variant]] of a sweep file once per seed, for the same "
                                     "budget, and write one table (mean ± sd) and overlay plots.")
    cs.add_argument("sweep", help="sweep file: a campaign plus [sweep], e.g. campaigns/compare-width.toml")
    cs.add_argument("--out", help="sweep folder (default: runs/sweep-<file name>)")
    cs.add_argument("--seeds", help="override [sweep] seeds, e.g. 0,1,2")
    cs.add_argument("--variants", help="run only these variants, e.g. heterofl,fedrolex")
    _add_runner_options(cs)
    cs.add_argument("--table-only", action="store_true",
                    help="run nothing: rebuild the reports and the table from the run folders in --out")
    cs.set_defaults(func=cmd_campaign_sweep)
    cc = csub.add_parser("compare", help="overlay several runs", description="Overlay runs: plot and table.")
    cc.add_argument("runs", nargs="+", help="run folders")
    cc.add_argument("--out", required=True, help="folder for compare.png, compare.md, compare.csv, compare.html")
    cc.set_defaults(func=cmd_campaign_compare)

    r = sub.add_parser("report", help="rebuild plots, report.html and summary.json of a run",
                       description="Rebuild plots/*.png, report.html and summary.json of a run folder.")
    r.add_argument("run", help="run folder")
    r.set_defaults(func=cmd_report)


def add_simulate_command(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    sm = sub.add_parser("simulate", help="N simulated clients that really train, on the virtual clock",
                        description="Simulate a campaign's method with N clients on the virtual clock "
                                    "(testbed.simulate): per-round sampling, real training in a worker pool.")
    sm.add_argument("campaign", help="campaign TOML: model, data, partition, [train], [[fleet]] boards and traces")
    sm.add_argument("--clients", type=int, required=True, help="simulated clients (shards of the training set)")
    sm.add_argument("--per-round", type=int, default=10, help="clients sampled per round (default 10)")
    sm.add_argument("--rounds", type=int, help="rounds (default: the campaign's [stop] rounds, else 50)")
    sm.add_argument("--engine", choices=("local", "ray"), default="local",
                    help="local worker processes, or Ray actors (RAY_ADDRESS, else a local Ray)")
    sm.add_argument("--workers", type=int, default=1, help="clients training at once (pool size)")
    sm.add_argument("--target-accuracy", type=float, help="for time-to-accuracy (default: [stop] target_accuracy)")
    sm.add_argument("--eval-every", type=int, default=1, help="evaluate the global model every N rounds")
    sm.add_argument("--eval-samples", type=int, help="held-out samples to evaluate on (default: all)")
    sm.add_argument("--out", help="folder for simulation.json (default runs/<campaign>-sim)")
    sm.set_defaults(func=cmd_simulate)
