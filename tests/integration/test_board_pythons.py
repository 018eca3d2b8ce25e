"""A board's interpreter (JetPack 5: CPython 3.8, JetPack 6: 3.10) runs the device agent, trains
with ONNX Runtime and federates through a real broker, from a venv that holds only the board's
packages (so nothing of onnx, scikit-learn, amqtt or the host packages can be imported by it).
Required in CI (ORCHARD_REQUIRE_BOARD_PYTHONS=1); skipped here with its reason when the
interpreter is absent."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from models.artifacts import ensure_artifacts
from models.structure import full_structure
from tests.board_pythons import REQUIRE_ENV, board_venv, find_python
from tests.conftest import require_or_skip
from tests.unit.test_isolation import BLOCKED, PROBE

ROOT = Path(__file__).resolve().parents[2]
AGENT_VERSIONS = ("3.8", "3.10")


def _venv_python(version: str) -> Path:
    python = find_python(version)
    require_or_skip(REQUIRE_ENV, python is not None, f"no CPython {version} on this host (pyenv install {version})")
    assert python is not None
    return board_venv(version, python) / "bin" / "python"


@pytest.mark.integration
@pytest.mark.parametrize("version", AGENT_VERSIONS)
def test_board_isolation_check_under(version: str, tmp_path: Path) -> None:
    python = _venv_python(version)
    directory = ensure_artifacts(full_structure("lenet", (1, 8, 8), 10), "sgd", tmp_path).directory
    proc = subprocess.run([str(python), "-c", PROBE, str(directory), ",".join(BLOCKED)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [] and out["last"] < out["first"], out


@pytest.mark.integration
@pytest.mark.parametrize("version", AGENT_VERSIONS)
def test_device_agent_federates_under(version: str, federation: Callable[..., Any], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    python = _venv_python(version)
    h = federation("amqtt", devices=2, rounds=3, local_steps=10)
    h.fed.device_python = str(python)
    # As under systemd (Type=notify, WatchdogSec=0.4 s): the agents report READY and ping the watchdog.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.1)
    messages: list[str] = []
    done = threading.Event()

    def listen() -> None:  # as systemd does: read as they come (the agent never blocks on a full queue)
        while not done.is_set():
            with contextlib.suppress(OSError):
                messages.append(notify.recv(4096).decode().split("\n")[0])

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    h.start_warm()
    running = {os.path.realpath(f"/proc/{p.pid}/exe") for p in h.fed.devices.values()}
    assert all(Path(exe).name.startswith(f"python{version}") for exe in running), running
    assert h.wait_server_exit(120) == 0, h.diagnose()
    accepted = h.find("update_accepted")
    assert {r["device"] for r in accepted} == {"dev0", "dev1"}, h.diagnose()
    assert [int(r["version"]) for r in h.rows()] == [1, 2, 3]
    assert not h.find("update_rejected")
    # A short federation can end before a second ping is due (one every 0.2 s per agent); the
    # agents keep looping until stopped, so give their watchdogs the time to turn.
    deadline = time.monotonic() + 10
    while messages.count("WATCHDOG=1") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    h.fed.stop_all()
    time.sleep(0.3)
    done.set()
    listener.join(2)
    notify.close()
    assert messages.count("READY=1") == 2 and messages.count("STOPPING=1") == 2, messages
    assert messages.count("WATCHDOG=1") >= 2, messages
