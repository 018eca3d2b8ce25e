"""The CPython versions boards run (JetPack 5: 3.8, JetPack 6: 3.10, Pi OS Bookworm: 3.11), found
on this host, and a cached venv per version holding only the board's packages.

Interpreters come from $ORCHARD_BOARD_PYTHONS (`3.8=/path/python3.8,3.10=...`), else pyenv's
versions folder, else `pythonX.Y` on PATH. The venvs live under .cache/board-venvs/ and are reused
while the package set is unchanged, so a rerun costs nothing; onnxruntime-training goes in with
--no-deps, as on a board (its metadata pulls onnx, sympy, h5py, ..., none of which the training
API imports).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOARD_VERSIONS = ("3.8", "3.9", "3.10", "3.12")  # 3.11 is the host's own
ORT_PIN = "onnxruntime-training-cpu==1.19.2"
BOARD_PACKAGES = ("numpy>=1.24,<2", "paho-mqtt>=2,<3", "psutil>=5.9", "tomli>=1.1; python_version < '3.11'")
REQUIRE_ENV = "ORCHARD_REQUIRE_BOARD_PYTHONS"


def find_python(version: str) -> Path | None:
    for item in filter(None, os.environ.get("ORCHARD_BOARD_PYTHONS", "").split(",")):
        v, _, path = item.partition("=")
        if v.strip() == version:
            return Path(path.strip())
    roots = [Path(os.environ["PYENV_ROOT"])] if "PYENV_ROOT" in os.environ else []
    roots += [Path.home() / ".pyenv", Path("/root/.pyenv")]
    for root in roots:
        found = sorted((root / "versions").glob(f"{version}.*/bin/python{version}"))
        if found:
            return found[-1]
    which = shutil.which(f"python{version}")
    return Path(which) if which else None


def board_venv(version: str, python: Path) -> Path:
    """A venv for `version` with only the board packages; built once, then reused."""
    wanted = "\n".join([*BOARD_PACKAGES, ORT_PIN, str(python)])
    stamp_text = hashlib.sha256(wanted.encode()).hexdigest()
    venv = ROOT / ".cache" / "board-venvs" / version
    stamp = venv / ".orchard-stamp"
    if stamp.is_file() and stamp.read_text() == stamp_text and (venv / "bin" / "python").exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    steps = [[str(python), "-m", "venv", str(venv)], [*pip, *BOARD_PACKAGES], [*pip, "--no-deps", ORT_PIN]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {proc.stderr[-1500:]}")
    stamp.write_text(stamp_text)
    return venv

