"""`pip install orchard` is the board runtime only: in a fresh venv it brings numpy, paho-mqtt,
psutil (and tomli below 3.11) and nothing of the host side, and the device entry points work."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOST_ONLY = {"onnx", "scikit-learn", "amqtt", "matplotlib", "onnxruntime-training-cpu", "sympy", "torch"}


@pytest.mark.integration
def test_pip_install_dot_is_the_board_runtime_only(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    # A copy of the source (no .venv, .cache, build leftovers), as a user's checkout would be.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".cache", ".git", "runs", "dist", "build",
                                                             "*.egg-info", "__pycache__", "tests", "bench"))
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout
    installed = {line.split("==")[0].lower() for line in listed.splitlines() if "==" in line}
    assert {"orchard", "numpy", "paho-mqtt", "psutil"} <= installed, installed
    assert not installed & HOST_ONLY, installed & HOST_ONLY
    # Run from elsewhere, so the copy installed into the venv is what is imported.
    for cmd in ([py, "-m", "runtime", "--help"], [str(venv / "bin" / "orchard-device"), "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert out.returncode == 0 and "--config" in out.stdout, (cmd, out.stderr)
    # The host command says what is missing, in one line, instead of a traceback.
    out = subprocess.run([str(venv / "bin" / "orchard"), "campaign", "run", "x.toml"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "orchard[host]" in out.stderr, out.stderr
