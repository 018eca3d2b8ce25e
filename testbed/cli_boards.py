"""`orchard bundle`, `flash`, `lab init` and `broker`: the commands for real boards (testbed/cli.py
registers them)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError


def cmd_bundle(args: argparse.Namespace) -> int:
    from testbed.bundle import build_bundle

    given = {"board": args.board, "device_id": args.device_id, "broker_url": args.broker, "root": args.root,
             "profiles": args.profiles, "shard": Path(args.shard) if args.shard else None}
    if args.lab:
        from testbed.lab import bundle_args, load_lab

        if not args.device_id:
            raise ConfigError("--lab needs --device-id (one of the lab's [[device]] ids)")
        lab = load_lab(Path(args.lab))
        # The lab's entry, except what the command line says itself.
        given = {**bundle_args(lab, args.device_id), **{k: v for k, v in given.items() if v is not None}}
        out = Path(args.out or lab.folder / "dist")
        if args.secrets is None and (lab.folder / "secrets").is_dir():
            args.secrets = str(lab.folder / "secrets")  # what `orchard lab init` provisioned
    else:
        missing = [flag for flag, key in (("--board", "board"), ("--broker", "broker_url")) if not given[key]]
        if missing:
            raise ConfigError(f"bundle needs {' and '.join(missing)} (or --lab LAB --device-id ID)")
        out = Path(args.out or "dist")
    tar = build_bundle(
        str(given["board"]), out, device_id=given["device_id"], broker_url=str(given["broker_url"]),
        root=str(given["root"] or "orchard/default"), profiles=given["profiles"] or ["dense"], model=args.model,
        dataset=args.dataset, shard=given["shard"], python=args.python, force=args.force,
        optimizer=args.optimizer, cache_dir=Path(args.cache) if args.cache else None, data_root=args.data_root,
        ort_wheel=Path(args.ort_wheel) if args.ort_wheel else None, board_python=args.board_python, arch=args.arch,
        pareto=Path(args.pareto) if args.pareto else None, secrets=Path(args.secrets) if args.secrets else None,
    )
    print(tar)
    return 0


def cmd_flash(args: argparse.Namespace) -> int:
    import shlex

    from testbed.bundle import flash

    bundle, host = args.bundle, args.host
    if args.lab:
        from testbed.lab import flash_target, load_lab

        if not args.device_id or bundle:
            raise ConfigError("--lab takes --device-id ID and no bundle path (the lab's dist/ has it)")
        tar, host = flash_target(load_lab(Path(args.lab)), args.device_id, host)
        bundle = str(tar)
    elif not bundle or not host:
        raise ConfigError("flash needs a bundle .tar.gz and --host (or --lab LAB --device-id ID)")
    cmds = flash(Path(bundle), host, ssh=args.ssh, scp=args.scp, dry_run=args.dry_run,
                 wheel=Path(args.wheel) if args.wheel else None,
                 install_args=args.install_args)
    if args.dry_run:
        print("\n".join(shlex.join(c) for c in cmds))
    return 0


def cmd_lab_init(args: argparse.Namespace) -> int:
    from testbed.lab import init_lab

    lab = init_lab(Path(args.lab), Path(args.campaign), broker_host=args.broker_host, port=args.port,
                   broker_kind=args.broker_kind, force=args.force)
    print(f"lab {lab.folder}: {len(lab.devices)} devices ({', '.join(d.device_id for d in lab.devices)}), "
          f"root {lab.root}, boards reach the broker at {lab.broker_url}")
    steps = [f"orchard broker --lab {lab.folder}",
             f"orchard server --config {lab.folder / 'configs' / 'server.toml'} --out {lab.folder / 'run'} "
             f"--broker mqtt://127.0.0.1:{lab.port}",
             f"orchard bundle --lab {lab.folder} --device-id ID && orchard flash --lab {lab.folder} --device-id ID"]
    print(f"next: fill in each [[device]] host in {lab.folder / 'lab.toml'}, then", *steps, sep="\n  ")
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from testbed.lab import lab_broker, load_lab, serve

    broker = lab_broker(load_lab(Path(args.lab)), kind=args.kind, listen=args.listen, port=args.port,
                        insecure_anonymous=args.insecure_anonymous)
    return serve(broker, lambda line: print(line, flush=True), lab_folder=Path(args.lab))



def add_board_commands(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    from models.structure import MODELS

    b = sub.add_parser("bundle", help="build a board bundle (runtime, board config, device.toml, installer)",
                       description="Build what goes onto a board: runtime, board config, device.toml, optional "
                                   "shard and artifacts, install.sh, systemd unit; writes a .tar.gz.")
    b.add_argument("--lab", help="a lab folder (`orchard lab init`): board, broker, root, profiles and shard "
                                 "come from its --device-id entry; the bundle goes to LAB/dist/")
    b.add_argument("--board", help="board name in firmware_configs/ or a board TOML path")
    b.add_argument("--out", help="output folder (default dist/, or LAB/dist/)")
    b.add_argument("--device-id", help="device id (default: the board's hostname at install time)")
    b.add_argument("--broker", help="broker URL as the board sees it, mqtt://HOST:1883")
    b.add_argument("--root", help="campaign topic root (must match the server; default orchard/default)")
    b.add_argument("--profiles", nargs="+")
    b.add_argument("--model", choices=MODELS, help="prebuild artifacts for this model")
    b.add_argument("--dataset", help="sets the model's input shape and classes (default digits)")
    b.add_argument("--data-root")
    b.add_argument("--shard", help=".npz with x (N, C, H, W) and y (N,)")
    b.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    b.add_argument("--secrets", help="a lab's secrets folder (RUN/secrets; default LAB/secrets with --lab): "
                                     "bundles the device's credentials (0600) and the run id")
    b.add_argument("--pareto", help="DISTREAL front (orchard dse): ship it and its vectors' artifacts")
    b.add_argument("--cache", help="artifact cache folder")
    b.add_argument("--python", default="python3", help="interpreter install.sh uses on the board")
    b.add_argument("--board-python", help="the board's CPython, e.g. 3.10 (default: the board config's [runtime])")
    b.add_argument("--arch", choices=("aarch64", "x86_64"), help="the board's machine (default: its [runtime])")
    b.add_argument("--ort-wheel", help="a built onnxruntime-training wheel for the board (checked: its tags "
                                       "against the board's Python and arch, and that it has the training API)")
    b.add_argument("--force", action="store_true")
    b.set_defaults(func=cmd_bundle)

    fl = sub.add_parser("flash", help="copy a bundle to a board over SSH and run its install.sh",
                        description="Copy a bundle to a board over SSH and run its install.sh. Everything "
                                    "after `--` goes to install.sh, e.g. `-- --broker mqtt://HOST:1883`.")
    fl.add_argument("bundle", nargs="?", help="bundle .tar.gz from `orchard bundle`")
    fl.add_argument("--host", help="user@host or an ssh config name")
    fl.add_argument("--lab", help="a lab folder: the bundle and host come from its --device-id entry")
    fl.add_argument("--device-id", help="with --lab: which device")
    fl.add_argument("--wheel", help="onnxruntime-training wheel to install with it (aarch64 boards)")
    fl.add_argument("--ssh", default="ssh")
    fl.add_argument("--scp", default="scp")
    fl.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    fl.set_defaults(install_args=[])  # what follows `--` (split off in _main): install.sh options
    fl.set_defaults(func=cmd_flash)

    la = sub.add_parser("lab", help="a lab of real boards", description="Set up a lab of real boards.")
    lsub = la.add_subparsers(dest="lab_command", required=True, metavar="ACTION", parser_class=parser_class)
    li = lsub.add_parser("init", help="write a lab folder from a campaign's fleet",
                         description="Write the server config, artifacts, held-out split, one shard per device "
                                     "and lab.toml (the lab's index) into LAB, from a campaign file's fleet.")
    li.add_argument("lab", help="lab folder to create")
    li.add_argument("--campaign", required=True, help="campaign TOML whose fleet, model, data and strategy to use")
    li.add_argument("--broker-host", help="this host's address as the boards reach it (default: the address "
                                          "of the default route)")
    li.add_argument("--port", type=int, default=1883)
    li.add_argument("--broker-kind", default="mosquitto", choices=("mosquitto", "embedded"))
    li.add_argument("--force", action="store_true", help="replace an existing lab folder")
    li.set_defaults(func=cmd_lab_init)

    br = sub.add_parser("broker", help="run the lab's MQTT broker (mosquitto or the embedded one)",
                        description="Start the lab's broker (lab.toml [broker]) and keep it up until Ctrl-C, with "
                                    "the lab's logins and ACLs (LAB/secrets/); --insecure-anonymous serves "
                                    "anonymously instead (a closed lab network only).")
    br.add_argument("--lab", required=True, help="lab folder")
    br.add_argument("--kind", choices=("mosquitto", "embedded"), help="override lab.toml [broker] kind")
    br.add_argument("--listen", help="address to listen on (default lab.toml's, 127.0.0.1)")
    br.add_argument("--port", type=int, help="override lab.toml [broker] port")
    br.add_argument("--insecure-anonymous", action="store_true",
                    help="let an anonymous broker listen beyond loopback (a closed lab network only)")
    br.set_defaults(func=cmd_broker)

