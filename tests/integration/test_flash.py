"""`orchard flash` with the README's own arguments, against fake `ssh` and `scp` that play the
board on this host: scp copies into a fake board's /tmp, ssh runs the remote command there, with
`sudo` installing into a prefix without the service. The install is the real one: offline, from
the bundle's locked wheels, onnxruntime-training without its onnx dependency."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.board_wheels import board_lock
from testbed.bundle import _wheel_cache, build_bundle
from testbed.cli import main

FAKE_SCP = """#!/bin/sh
# scp SRC... HOST:/tmp/DIR/  ->  copy into that folder of the fake board
echo "scp $*" >> "$FAKE_BOARD/calls.log"
n=$#; i=1
for a in "$@"; do last="$a"; done
dest="$FAKE_BOARD${last#*:}"
for a in "$@"; do [ "$i" -lt "$n" ] && cp "$a" "$dest"; i=$((i + 1)); done
"""
FAKE_SSH = """#!/bin/sh
# ssh [-t] HOST COMMAND  ->  run COMMAND on the fake board (its /tmp, its sudo); it prints board paths
echo "ssh $*" >> "$FAKE_BOARD/calls.log"
[ "$1" = -t ] && shift
cmd=$(printf '%s' "$2" | sed "s#/tmp#$FAKE_BOARD/tmp#g")
PATH="$FAKE_BOARD/bin:$PATH" sh -c "$cmd" | sed "s#$FAKE_BOARD##g"
"""
FAKE_SUDO = """#!/bin/sh
exec "$@" --no-service --prefix "$FAKE_BOARD/opt/orchard"
"""


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.mark.integration
def test_flash_with_the_readme_arguments_installs_through_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    python3 = shutil.which("python3")
    if python3 is None or subprocess.run([python3, "-c", "import sys, venv; sys.exit(sys.version_info[:2] != (3, 11))"],
                                         check=False).returncode != 0:
        pytest.skip("the fake board's python3 must be CPython 3.11 with venv (the bundle's lock is for 3.11)")
    board = tmp_path / "board"
    for d in ("tmp", "bin", "opt"):
        (board / d).mkdir(parents=True)
    tools = tmp_path / "tools"
    tools.mkdir()
    _script(tools / "scp", FAKE_SCP)
    _script(tools / "ssh", FAKE_SSH)
    _script(board / "bin" / "sudo", FAKE_SUDO)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_BOARD", str(board))
    # An x86_64 "board" (this host), so the ORT wheel can be PyPI's and the install can run here.
    _, wheels = board_lock("3.11", "x86_64", _wheel_cache(), with_ort=True)
    [pypi] = [w for w in wheels if w.name.startswith("onnxruntime_training")]
    wheel = tmp_path / pypi.name
    shutil.copyfile(pypi, wheel)
    monkeypatch.chdir(tmp_path)
    build_bundle("rpi4b-4gb", Path("dist"), device_id="pi7", broker_url="mqtt://192.168.1.10:1883",
                 root="orchard/lab", profiles=["dense"], model=None, dataset=None, shard=None, arch="x86_64",
                 ort_wheel=wheel)
    # The README's line, word for word but for the wheel's name:
    # orchard flash dist/orchard-rpi4b-4gb-pi7.tar.gz --host pi@pi7.local --wheel <wheel>
    code = main(["flash", "dist/orchard-rpi4b-4gb-pi7.tar.gz", "--host", "pi@pi7.local", "--wheel", wheel.name])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    calls = (board / "calls.log").read_text().splitlines()
    # A private folder on the board first (mktemp -d), then the copy into it, then the install.
    assert calls[0] == "ssh pi@pi7.local mktemp -d /tmp/orchard-flash.XXXXXXXX"
    private = calls[1].split(":")[-1].rstrip("/")
    assert re.fullmatch(r"/tmp/orchard-flash\.[A-Za-z0-9]{8}", private), calls
    assert calls[1] == f"scp dist/orchard-rpi4b-4gb-pi7.tar.gz {wheel.name} pi@pi7.local:{private}/"
    assert calls[2].startswith(f"ssh -t pi@pi7.local cd {private} && tar xzf orchard-rpi4b-4gb-pi7.tar.gz")
    assert f"install.sh --wheel {private}/{wheel.name}" in calls[2]
    venv_python = board / "opt" / "orchard" / "venv" / "bin" / "python"
    listed = subprocess.run([str(venv_python), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                            text=True, check=True).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert {"numpy", "paho-mqtt", "psutil", "onnxruntime-training-cpu"} <= names, names
    assert not names & {"onnx", "sympy", "h5py", "cerberus", "protobuf", "scikit-learn", "amqtt"}, names
