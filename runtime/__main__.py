"""`python -m runtime --config device.toml [--broker URL]`: what a board runs."""

from __future__ import annotations

from runtime import startup

startup.mark("interpreter")  # first: process start to here is the interpreter's own start-up
startup.add_site_packages()  # started with -S (runtime/startup.py PYTHON_FLAGS): the venv's packages

import sys  # noqa: E402

from runtime.errors import OrchardError, exit_code, one_line  # noqa: E402

# What paho imports at its top but the agent's path never uses (runtime/startup.py defer_import):
# urllib.request (with http.client, email, tempfile) for proxies it looks up only with PySocks
# installed, ssl for mqtts:// (loaded by tls_set then), uuid for client ids (ours are given);
# traceback (with linecache and tokenize), which logging imports for formatting an exception.
DEFERRED_IMPORTS = ("urllib.request", "ssl", "uuid", "traceback")


def main(argv: list[str] | None = None) -> int:
    startup.hold_gc()  # until the agent is connected (runtime/startup.py)
    for name in DEFERRED_IMPORTS:
        startup.defer_import(name)
    try:
        return _main(argv)
    finally:
        startup.release_gc()  # a no-op once the agent has released it


def _main(argv: list[str] | None) -> int:
    import argparse
    import logging

    p = argparse.ArgumentParser(prog="python -m runtime", description="Run an Orchard device agent.")
    p.add_argument("--config", required=True, help="device TOML ([device] and [broker] tables)")
    p.add_argument("--broker", help="broker URL, overriding [broker] url (mqtt://host:port)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        from runtime.agent import run_device
        from runtime.device_config import load_device_config

        startup.mark("imports")
        cfg = load_device_config(args.config, args.broker)
        startup.mark("config")
        return run_device(cfg)
    except OrchardError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
