"""Failures that must say what went wrong, in one line: `orchard server` on a run folder that
has results, and `orchard federate` when its server dies at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from runtime.errors import EXIT_CONFIG

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_server_refuses_a_run_folder_with_results_unless_resume_or_force(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_text('{"event": "server_start"}\n')
    proc = run("-m", "server", "--config", str(tmp_path / "server.toml"), "--out", str(tmp_path))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == EXIT_CONFIG and len(lines) == 1, proc.stderr
    assert "has results (events.jsonl); pass --resume to continue it or --force to overwrite it" in lines[0]
    assert (tmp_path / "events.jsonl").read_text() == '{"event": "server_start"}\n'  # nothing lost
    # With --force it goes on to read its config (missing here), so that is the error it reports.
    proc = run("-m", "server", "--config", str(tmp_path / "server.toml"), "--out", str(tmp_path), "--force")
    assert proc.returncode == EXIT_CONFIG and "server.toml" in proc.stderr and "has results" not in proc.stderr


def test_federate_prints_the_servers_own_error(tmp_path: Path) -> None:
    proc = run("-m", "testbed.cli", "federate", "--devices", "1", "--rounds", "1", "--param", "k_fraction=5",
               "--out", str(tmp_path / "f"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and lines, proc.stderr
    want = f"error: the server exited with code {EXIT_CONFIG} before it wrote anything:"
    assert lines[-1].startswith(want), lines[-1]
    assert "k_fraction=5 is outside (0.0, 1.0]" in lines[-1] and "server.csv" not in lines[-1]
