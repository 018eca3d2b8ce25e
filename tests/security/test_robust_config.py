"""Bad input, one line: every bad server config gets one `error:` line (capped, no traceback) and
a typed exit code; a campaign whose broker is unreachable exits non-zero; run folders are 0750
and their files 0640. Before: five bad server configs gave tracebacks, and that campaign exited 0."""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.errors import MESSAGE_MAX
from runtime.tomlconf import load_toml
from server.__main__ import main as server_main
from testbed.broker import free_port
from testbed.federate import FederationSpec, prepare, write_toml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare(FederationSpec(out=tmp_path_factory.mktemp("cfg") / "run", devices=1, rounds=1))


@pytest.fixture(autouse=True)
def keep_umask() -> Iterator[None]:
    old = os.umask(0o022)  # server main sets 027 for the process: put the test's back afterwards
    os.umask(old)
    yield
    os.umask(old)


def bad_eval(kind: str, tmp: Path) -> Path:
    p = tmp / f"eval-{kind}.npz"
    if kind == "missing":
        return tmp / "nowhere.npz"
    if kind == "not-npz":
        p.write_text("x,y\n1,2\n")
    elif kind == "pickled":
        p.write_bytes(pickle.dumps({"x": [1.0], "y": [0]}))
    elif kind == "object-array":
        np.savez(p, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    elif kind == "directory":
        p.mkdir()
    elif kind == "no-y":
        np.savez(p, x=np.zeros((3, 4), np.float32))
    return p


CASES: list[tuple[str, dict[str, dict[str, Any]], int, str]] = [
    *[(f"eval_data {k}", {"server": {"eval_data": k}}, 3, want) for k, want in (
        ("missing", "no such file"), ("not-npz", "not an .npz"), ("pickled", "not an .npz"),
        ("object-array", "not an .npz"), ("directory", "is a directory"), ("no-y", "no y array"))],
    ("artifacts a directory", {"server": {"artifacts": "."}}, 3, "cannot read"),
    ("root with a wildcard", {"server": {"root": "orchard/+"}}, 3, "wildcard"),
    ("root with #", {"server": {"root": "orchard/#"}}, 3, "wildcard"),
    ("profile without artifact", {"assign": {"devices": {"dev0": "width=0.3"}}}, 3, "cannot be sent"),
    ("unknown key", {"rounds": {"bogus": 1}}, 3, "bogus"),
    ("bad robust merge", {"strategy": {"robust_merge": "x" * 2000}}, 3, "robust_merge"),
]


@pytest.mark.parametrize(("what", "edit", "code", "want"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_server_config_is_one_line_and_a_typed_exit(run: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                          what: str, edit: dict[str, dict[str, Any]], code: int,
                                                          want: str) -> None:
    data = load_toml(run / "configs" / "server.toml")
    for table, values in edit.items():
        values = dict(values)
        if table == "server" and "eval_data" in values:
            values["eval_data"] = str(bad_eval(values["eval_data"], tmp_path))
        if table == "server" and values.get("artifacts") == ".":
            values["artifacts"] = str(tmp_path)
        data.setdefault(table, {}).update(values)
    if "artifacts" not in edit.get("server", {}):
        data["server"]["artifacts"] = str(run / "artifacts.json")
    if "eval_data" not in edit.get("server", {}):
        data["server"]["eval_data"] = str(run / "eval.npz")
    cfg = tmp_path / "server.toml"
    write_toml(cfg, data)
    rc = server_main(["--config", str(cfg), "--out", str(tmp_path / "out")])
    err = capfd.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert rc == code, err
    assert len(errors) == 1 and want in errors[0] and len(errors[0]) <= MESSAGE_MAX + 7, err
    assert not any("Traceback" in line for line in err)


def test_unreachable_broker_fails_the_campaign_and_run_folders_are_private(tmp_path: Path) -> None:
    campaign = tmp_path / "unreach.toml"
    campaign.write_text(f"""
[campaign]
name = "unreach"
[stop]
rounds = 2
duration_board_s = 30
[model]
name = "lenet"
dataset = "digits"
[strategy]
name = "fedavg"
[train]
local_steps = 2
[broker]
kind = "url"
url = "mqtt://127.0.0.1:{free_port()}"
[throttle]
backend = "none"
[[fleet]]
name = "pi"
board = "rpi4b-4gb"
count = 1
""")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "campaign", "run", str(campaign), "--out", str(out),
                           "--no-throttle", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 5 and errors and "cannot connect" in errors[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    for p in (out / "config.toml", out / "events.jsonl", out / "configs" / "server.toml", out / "eval.npz"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
    for d in (out / "configs", out / "shards", out / "logs"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o750, d


def test_a_handler_exception_refuses_that_message_and_the_service_keeps_serving(run: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Any exception a message finds in a handler is logged as that message's rejection, never an
    exit; the roster refuses other ids; hellos are rate limited per device."""
    import json

    from runtime.mqtt import Message
    from runtime.seal import seal
    from server.config import load_server_config
    from server.service import Service
    from testbed.lab_secrets import load_lab
    from tests.security.test_robust_attacks import hello_bytes

    service = Service(load_server_config(run / "configs" / "server.toml"), tmp_path / "out")
    root = service.cfg.root
    lab = load_lab(run)
    key = lab.devices["dev0"].hmac_key
    assert key is not None

    def sealed_hello(device_id: str) -> bytes:  # as dev0 seals it (secauth): opened before the handler
        return seal(hello_bytes(device_id), key=key, run_id=lab.run_id, device_id=device_id, kind="hello")

    def boom(event: object) -> list[object]:
        raise RuntimeError("a bug this message found")

    monkeypatch.setattr(service.engine, "handle", boom)
    service._on_message(Message(f"{root}/dev/dev0/hello", sealed_hello("dev0"), False, 1))
    monkeypatch.undo()
    service._on_message(Message(f"{root}/dev/intruder/hello", hello_bytes("intruder"), False, 1))
    for _ in range(12):
        service._on_message(Message(f"{root}/dev/dev0/hello", sealed_hello("dev0"), False, 1))
    service.out.close()
    events = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    rejected = [(e["device"], e["reason"]) for e in events if e["event"] == "hello_rejected"]
    assert rejected[0] == ("dev0", "internal error RuntimeError: a bug this message found")
    assert rejected[1] == ("intruder", "device 'intruder' is not on the roster")
    rate = [r for _, r in rejected[2:]]  # 13 hellos, 10 in the bucket (one more if 2 s passed)
    assert 2 <= len(rate) <= 3 and set(rate) == {"hello from 'dev0' refused: more than 10 in 20 s"}
    assert "intruder" not in service.engine.devices and "dev0" in service.engine.devices
