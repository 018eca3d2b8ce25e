"""The runtime's bytecode, compiled before a device starts, as a board has it.

A board's install.sh compiles runtime/ once (`python -m compileall`), because its service user
cannot write `__pycache__` under the root-owned prefix. An emulated device must start the same
way: an interpreter that finds no fresh .pyc compiles every module it imports from source, on
every start, and under a Pi Zero 2 W's quota (0.048 host cores) that alone was ~0.03 CPU s of
its ~0.2 s to the hello. Nothing writes them otherwise when the host sets
PYTHONDONTWRITEBYTECODE (this one does), so the testbed compiles before it spawns devices.
compileall only rewrites what is stale (timestamp check), so a second call costs a stat per file.
"""

from __future__ import annotations

import compileall
import subprocess
import sys
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"


def compile_runtime(python: str = sys.executable) -> None:
    """Fresh .pyc for every runtime/ module, for `python`'s cache tag (a board's CPython 3.8 has
    its own)."""
    if Path(python).resolve() == Path(sys.executable).resolve():
        compileall.compile_dir(str(RUNTIME), quiet=1)
    else:
        subprocess.run([python, "-m", "compileall", "-q", str(RUNTIME)], check=True, capture_output=True)
