"""A lab from a campaign file: `orchard lab init` lays it out, `orchard broker` serves it (with
the lab's logins and ACLs from LAB/secrets), and a server and a device agent started from
the lab's own files train through that broker. `orchard bundle`/`flash` take its entries."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import ConfigError, TransportError
from runtime.mqtt import MqttClient, MqttConfig
from testbed.broker import free_port, port_accepts
from testbed.cli import main
from testbed.lab import init_lab, lab_broker, load_lab
from testbed.lab_secrets import load_lab as load_secrets

ROOT = Path(__file__).resolve().parents[2]
CAMPAIGN = """
[campaign]
name = "tiny"
seed = 0
[stop]
rounds = 2
duration_board_s = 60
[model]
name = "mlp"
dataset = "digits"
partition = "iid"
eval_fraction = 0.2
[strategy]
name = "fedavg"
[train]
local_steps = 5
lr = 0.1
batch_size = 32
[broker]
kind = "mosquitto"
[[fleet]]
name = "pi"
board = "rpi4b-4gb"
count = 2
profile = "dense"
"""


@pytest.fixture
def lab(tmp_path: Path):
    campaign = tmp_path / "tiny.toml"
    campaign.write_text(CAMPAIGN)
    return init_lab(tmp_path / "lab", campaign, broker_host="192.168.1.10", port=free_port("127.0.0.1"))


def test_lab_init_writes_what_server_and_boards_start_from(lab, tmp_path: Path) -> None:
    folder = lab.folder
    for name in ("lab.toml", "artifacts.json", "init.npy", "eval.npz", "configs/server.toml", "shards/pi-0.npz",
                 "shards/pi-1.npz", "configs/pi-0.toml"):
        assert (folder / name).is_file(), name
    assert [d.device_id for d in lab.devices] == ["pi-0", "pi-1"] and lab.root == "orchard/lab"
    assert lab.broker_url.startswith("mqtt://192.168.1.10:") and lab.listen == "127.0.0.1"
    assert (folder / "secrets").stat().st_mode & 0o077 == 0 and (folder / "secrets" / "pi-0.toml").is_file()
    with np.load(folder / "shards/pi-0.npz") as a, np.load(folder / "shards/pi-1.npz") as b, \
            np.load(folder / "eval.npz") as e:
        assert len(a["y"]) + len(b["y"]) + len(e["y"]) == 1797  # digits, split without loss or overlap
    with pytest.raises(ConfigError, match="exists; pass --force"):
        init_lab(folder, tmp_path / "tiny.toml")
    with pytest.raises(ConfigError, match="no such file"):
        init_lab(tmp_path / "other", tmp_path / "missing.toml")
    assert not (tmp_path / "other").exists()
    with pytest.raises(ConfigError, match="not a lab"):
        load_lab(tmp_path)


def test_the_lab_broker_serves_the_labs_secrets_and_anonymous_only_when_asked(lab) -> None:
    served = lab_broker(lab, listen="0.0.0.0")  # logins checked: it may listen where boards reach it
    assert served.url.startswith("mqtt://0.0.0.0:") and served.lab is not None
    assert served.lab.run_id == load_secrets(lab.folder).run_id
    anonymous = lab_broker(lab, kind="embedded", listen="0.0.0.0", insecure_anonymous=True)
    assert anonymous.lab is None
    shutil.rmtree(lab.folder / "secrets")
    with pytest.raises(ConfigError, match="has no secrets/"):
        lab_broker(lab)


def _client(url: str, name: str, username: str | None = None, password: str | None = None) -> MqttClient:
    c = MqttClient(url, MqttConfig(client_id=name, keepalive_s=5, connect_timeout_s=5, username=username,
                                   password=password))
    c.connect()
    return c


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["mosquitto", "embedded"])
def test_the_lab_broker_refuses_anonymous_and_admits_a_board_of_the_lab(lab, mosquitto_bin: str, kind: str) -> None:
    secrets = load_secrets(lab.folder)
    board = secrets.devices["pi-0"]
    broker = lab_broker(lab, kind=kind)
    with broker:
        port = broker.url.rsplit(":", 1)[1]
        with pytest.raises(TransportError):
            _client(f"mqtt://127.0.0.1:{port}", "anon")
        with pytest.raises(TransportError):
            _client(f"mqtt://127.0.0.1:{port}", "pi-0", "pi-0", "not-its-password")
        _client(f"mqtt://127.0.0.1:{port}", "pi-0", board.username, board.password).close()


@pytest.mark.integration
def test_a_lab_trains_through_orchard_broker(lab, mosquitto_bin: str, tmp_path: Path) -> None:
    """The README's Real boards steps on this host: broker, server, and two devices started from
    the lab's files (as a board's agent would be, with the lab's broker)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{len(procs)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)
        return proc

    url = f"mqtt://127.0.0.1:{lab.port}"
    try:
        broker = spawn("-m", "testbed.cli", "broker", "--lab", str(lab.folder))
        deadline = time.monotonic() + 20
        while not port_accepts("127.0.0.1", lab.port):
            assert broker.poll() is None and time.monotonic() < deadline, (tmp_path / "0.log").read_text()
            time.sleep(0.1)
        server = spawn("-m", "server", "--config", str(lab.folder / "configs/server.toml"), "--out",
                       str(lab.folder / "run"), "--broker", url)
        for d in lab.devices:
            spawn("-m", "runtime", "--config", str(lab.folder / "configs" / f"{d.device_id}.toml"), "--broker", url)
        assert server.wait(120) == 0, (tmp_path / "1.log").read_text()[-2000:]
        rows = (lab.folder / "run" / "server.csv").read_text().splitlines()
        assert len(rows) == 3  # header + 2 versions
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(15)
    assert broker.returncode == 0, (tmp_path / "0.log").read_text()  # a clean stop on SIGTERM
    assert not port_accepts("127.0.0.1", lab.port)


def test_bundle_and_flash_take_the_labs_entries(lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bundle", "--lab", str(lab.folder), "--device-id", "pi-1"]) == 0
    tar = lab.folder / "dist" / "orchard-rpi4b-4gb-pi-1.tar.gz"
    assert tar.is_file()
    device_toml = (lab.folder / "dist" / "orchard-rpi4b-4gb-pi-1" / "device.toml").read_text()
    assert f'url = "{lab.broker_url}"' in device_toml and 'root = "orchard/lab"' in device_toml
    capsys.readouterr()
    assert main(["flash", "--lab", str(lab.folder), "--device-id", "pi-1", "--dry-run"]) == 3
    assert "has no host" in capsys.readouterr().err
    text = (lab.folder / "lab.toml").read_text().replace('host = ""  # SSH target, e.g. pi@pi-1.local',
                                                         'host = "pi@pi-1.local"')
    (lab.folder / "lab.toml").write_text(text)
    assert main(["flash", "--lab", str(lab.folder), "--device-id", "pi-1", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "ssh pi@pi-1.local 'mktemp -d /tmp/orchard-flash.XXXXXXXX'"
    assert out[1] == f"scp {tar} pi@pi-1.local:/tmp/orchard-flash.XXXXXXXX/"
    assert out[2].startswith("ssh -t pi@pi-1.local ")
    assert main(["bundle", "--lab", str(lab.folder), "--device-id", "pi-9"]) == 3
    assert "no device 'pi-9'" in capsys.readouterr().err
