"""The `orchard` command line.

Every command has `--help`, shows progress on long work, and on bad input exits non-zero with
one line `error: ...` (the `OrchardError` message, which names the bad value).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runtime.errors import EXIT_INTERRUPTED, EXIT_USAGE, ConfigError, OrchardError, exit_code, one_line
from testbed.cli_boards import add_board_commands
from testbed.cli_campaign import add_campaign_commands, add_simulate_command, fmt_value


def _progress_printer(enabled: bool) -> Callable[[int, int, float], None] | None:
    if not enabled or not sys.stderr.isatty():
        return None

    def show(step: int, total: int, loss: float) -> None:
        width = 30
        done = int(width * step / total)
        end = "\n" if step == total else ""
        sys.stderr.write(f"\r  [{'#' * done}{'.' * (width - done)}] step {step}/{total} loss {loss:.4f}{end}")
        sys.stderr.flush()

    return show


def cmd_train(args: argparse.Namespace) -> int:
    from models.central import CentralRun, train_central

    run = CentralRun(
        model=args.model, dataset=args.dataset, profile=args.profile, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch, lr=args.lr, seed=args.seed, threads=args.threads,
        optimizer=args.optimizer, data_root=args.data_root, test_fraction=args.test_fraction,
        cache_dir=Path(args.cache) if args.cache else None, samples=args.samples,
    )
    result = train_central(run, progress=_progress_printer(not args.quiet))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    keys = ("model", "profile", "params", "flops_per_sample", "steps", "loss_first", "loss_last",
            "eval_accuracy", "step_ms_median", "peak_rss_mb")
    print("  ".join(f"{k}={fmt_value(result[k])}" for k in keys))
    return 0


def cmd_artifacts_build(args: argparse.Namespace) -> int:
    from models.artifacts import artifacts_for
    from models.datasets import load_dataset
    from runtime.profile import parse_profile

    ds = load_dataset(args.dataset, args.data_root)
    sets = artifacts_for(args.model, ds.input_shape, ds.num_classes, args.profiles, optimizer=args.optimizer,
                         cache_dir=Path(args.cache) if args.cache else None)
    for text in args.profiles:
        art = sets[parse_profile(text).canonical()]
        note = f"  (rebuilt: {art.rebuilt_reason})" if art.rebuilt_reason else ""
        print(f"{text:<24} {art.key}  {art.directory}{note}")
    return 0


def cmd_federate(args: argparse.Namespace) -> int:
    from runtime.tomlconf import parse_param
    from testbed.federate import FederationSpec, run_federation
    from testbed.report import failure_line

    params = dict(parse_param(item) for item in args.param or [])
    method_params = dict(parse_param(item, "--method-param") for item in args.method_param or [])
    if method_params and not args.method:
        raise ConfigError("--method-param needs --method")
    spec = FederationSpec(
        out=Path(args.out), devices=args.devices, strategy=args.strategy, strategy_params=params,
        rounds=args.rounds, model=args.model, dataset=args.dataset, data_root=args.data_root,
        partition=args.partition, profiles=tuple(args.profiles), boards=tuple(args.boards),
        local_steps=args.local_steps, lr=args.lr, batch_size=args.batch, seed=args.seed, broker=args.broker,
        time_limit_s=args.time_limit, method=args.method, method_params=method_params,
    )

    def show(rows: list[dict[str, str]]) -> None:
        if args.quiet:
            return
        for r in rows:  # the new versions, each with its own accuracy
            acc = r["accuracy"] or "-"
            print(f"  version {r['version']:>3}/{args.rounds}  t={float(r['t_s']):6.1f}s  accuracy={acc:<8}"
                  f" updates={r['n_updates']} staleness_max={r['staleness_max']} ({r['reason']})", flush=True)

    summary = run_federation(spec, force=args.force, progress=show)
    keys = ("strategy", "duration_board_s", "rounds", "final_accuracy", "best_accuracy", "updates_accepted",
            "updates_rejected", "utilization", "server_exit")
    print("  ".join(f"{k}={fmt_value(summary.get(k))}" for k in keys))
    print(f"report: {Path(args.out) / 'report.html'}")
    failure = failure_line(summary)
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0 if summary.get("server_exit") == 0 else 1


class _Parser(argparse.ArgumentParser):
    """Bad usage is one line, like every other error (the usage text is in --help)."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from models.structure import MODELS

    p = _Parser(prog="orchard", description="On-device collaborative training and its testbed.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train one profile centrally through the device trainer",
                       description="Train a model centrally through the device trainer and report figures.")
    t.add_argument("--model", required=True, choices=MODELS)
    t.add_argument("--dataset", default="digits", help="digits | cifar10 | mnist | fashion-mnist | synthetic")
    t.add_argument("--data-root", help="folder with the dataset's files (cifar10, mnist, fashion-mnist)")
    t.add_argument("--profile", default="dense", help="e.g. dense, width=0.5, width=0.5,window=rolling, classes=0-4")
    t.add_argument("--steps", type=int, default=300, help="optimizer steps (0: use --epochs)")
    t.add_argument("--epochs", type=int, default=0, help="passes over the training split, when --steps is 0")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    t.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: host cores)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--test-fraction", type=float, default=0.2)
    t.add_argument("--samples", type=int, help="a stratified subset of this many samples, as a campaign's "
                   "[model] samples draws it (same seed: the same training and held-out split)")
    t.add_argument("--cache", help="artifact cache folder (default: $ORCHARD_CACHE or ~/.cache/orchard)")
    t.add_argument("--json", help="write the figures to this JSON file")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    a = sub.add_parser("artifacts", help="training artifacts", description="Manage training artifacts.")
    asub = a.add_subparsers(dest="artifacts_command", required=True, metavar="ACTION", parser_class=_Parser)
    ab = asub.add_parser("build", help="build artifacts for profiles ahead of time",
                         description="Generate (or verify the cached) training artifacts for each profile.")
    ab.add_argument("--model", required=True, choices=MODELS)
    ab.add_argument("--dataset", default="digits", help="sets input shape and class count")
    ab.add_argument("--data-root")
    ab.add_argument("--profiles", nargs="+", default=["dense"], metavar="PROFILE")
    ab.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    ab.add_argument("--cache")
    ab.set_defaults(func=cmd_artifacts_build)

    f = sub.add_parser("federate", help="run a local federation: broker, server and N device processes",
                       description="Run broker, server and N device processes on this host (no throttling).")
    f.add_argument("--devices", type=int, default=4)
    f.add_argument("--strategy", default="semi-async",
                   choices=("fedavg", "fedavg-deadline", "semi-async", "fedbuff", "fedasync"))
    f.add_argument("--param", action="append", metavar="KEY=VALUE", help="strategy parameter, e.g. k=2")
    f.add_argument("--method", help="fedavg | heterofl | classes | fjord (default: each profile's own)")
    f.add_argument("--method-param", action="append", metavar="KEY=VALUE",
                   help="method key, e.g. widths=[0.25,0.5,1.0] or window=rolling")
    f.add_argument("--rounds", type=int, default=10, help="stop after this many aggregations")
    f.add_argument("--model", default="lenet", choices=MODELS)
    f.add_argument("--dataset", default="digits")
    f.add_argument("--data-root")
    f.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards:K | classes:0-4;5-9")
    f.add_argument("--profiles", nargs="+", default=["dense"], help="profiles, cycled over the devices")
    f.add_argument("--boards", nargs="+", default=["rpi4b-4gb"], help="board configs, cycled over the devices")
    f.add_argument("--local-steps", type=int, default=20)
    f.add_argument("--lr", type=float, default=0.1)
    f.add_argument("--batch", type=int, default=32)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--broker", default="amqtt", help="amqtt (embedded) | mosquitto | mqtt://host:port")
    f.add_argument("--time-limit", type=float, default=600.0, help="seconds")
    f.add_argument("--out", required=True, help="run folder")
    f.add_argument("--force", action="store_true", help="replace an existing run folder")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_federate)

    add_campaign_commands(sub, _Parser)
    add_board_commands(sub, _Parser)

    from models.dse import add_dse_parser

    add_dse_parser(sub)

    from testbed.mpsl_cli import add_parsers as add_mpsl_parsers

    add_mpsl_parsers(sub, _Parser)
    add_simulate_command(sub, _Parser)

    # Listed for `orchard --help`; main() hands their arguments to their own parsers.
    for name, what in (("server", "the aggregator (python -m server)"),
                       ("device", "a device agent, as a board runs it (python -m runtime)"),
                       ("compute-node", "an MP-SL compute node (python -m runtime.compute_node)")):
        sub.add_parser(name, help=f"run {what}", add_help=False)
    return p


HOST_PACKAGES = ("onnx", "sklearn", "amqtt", "matplotlib", "onnxruntime")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if sys.version_info < (3, 11):  # the board runtime runs on 3.8+, the host side does not
        print(f"error: the orchard command (host side) needs Python >= 3.11, this is {sys.version.split()[0]}; "
              "a board runs `orchard-device` (python -m runtime)", file=sys.stderr)
        return EXIT_USAGE
    # Run folders hold configs, shards and (with credentials) secrets: 0750 folders, 0640 files
    # for everything this process and its children (server, devices) create.
    os.umask(0o027)
    try:
        return _main(argv)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in HOST_PACKAGES:
            raise
        print(f"error: {exc.name} is not installed: the orchard command needs the host packages "
              "(pip install 'orchard[host]'; a board needs only `pip install orchard`)", file=sys.stderr)
        return EXIT_USAGE


def _main(argv: list[str]) -> int:
    # `server` and `device` hand everything after them to their own parsers (argparse's
    # REMAINDER would not take a leading option such as --help).
    if argv and argv[0] == "compute-node":
        from runtime.compute_node import main as node_main

        return node_main(argv[1:])
    if argv and argv[0] in ("server", "device"):
        from runtime.__main__ import main as device_main
        from server.__main__ import main as server_main

        return (server_main if argv[0] == "server" else device_main)(argv[1:])
    parser = build_parser()
    # `orchard flash ... -- --broker URL`: only what follows `--` is install.sh's, so flash's own
    # options may come in any order around the bundle path (argparse's REMAINDER took them all).
    install_args: list[str] = []
    if argv and argv[0] == "flash" and "--" in argv:
        cut = argv.index("--")
        argv, install_args = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if args.command == "flash":
        args.install_args = install_args
    try:
        code: int = args.func(args)
        return code
    except OrchardError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
