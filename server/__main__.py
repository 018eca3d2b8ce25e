"""`python -m server --config server.toml --out RUN [--broker URL] [--resume]`: the aggregator."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from runtime.errors import ConfigError, OrchardError, exit_code, one_line

RESULTS = ("events.jsonl", "server.csv")  # what a server run leaves; a new run would overwrite them


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="orchard server", description="Run the Orchard aggregator.")
    p.add_argument("--config", required=True, help="server TOML (see server/config.py)")
    p.add_argument("--out", required=True, help="run folder: events.jsonl, server.csv, devices/, checkpoint/")
    p.add_argument("--broker", help="broker URL, overriding [server] broker")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--force", action="store_true", help="start afresh in a run folder that has results, "
                   "overwriting them")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.umask(0o027)  # the run folder's files 0640, folders 0750
    try:
        from server.config import load_server_config
        from server.service import Service

        out = Path(args.out)
        results = [name for name in RESULTS if (out / name).is_file() and (out / name).stat().st_size > 0]
        if results and not (args.resume or args.force):
            raise ConfigError(f"run folder {out} has results ({', '.join(results)}); pass --resume to continue "
                              "it or --force to overwrite it")
        service = Service(load_server_config(args.config, args.broker), out, resume=args.resume)
        signal.signal(signal.SIGTERM, lambda *_: service.stop("terminated"))
        signal.signal(signal.SIGINT, lambda *_: service.stop("interrupted"))
        reason = service.run()
        logging.getLogger("orchard.server").info("finished: %s", reason)
        return 0
    except OrchardError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
