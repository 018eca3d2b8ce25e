"""Board bundles (testbed/bundle.py): layout, scripts, unit, device config, and that the bundled
runtime trains its bundled artifacts on its bundled shard with nothing but the board packages."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from runtime.board import ENV_CONFIG_DIR, load_board
from runtime.credentials import load_credentials
from runtime.device_config import load_device_config
from runtime.errors import ConfigError, OrchardError
from testbed.bundle import UNIT_NAME, build_bundle, flash
from testbed.lab_secrets import provision
from tests.unit.fake_wheels import fake_ort_wheel

ROOT = Path(__file__).resolve().parents[2]
BOARD = "rpi4b-4gb"
PROFILES = ["dense", "width=0.5"]
NAME = f"orchard-{BOARD}-pi7"


def _shard(path: Path, n: int = 96, shape: tuple[int, ...] = (1, 8, 8)) -> Path:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, n).astype(np.int64)
    x = (rng.normal(size=(n, *shape)) * 0.3 + y[:, None, None, None] / 10).astype(np.float32)
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, artifact_cache: Path) -> tuple[Path, Path]:
    """(bundle directory, tarball) for rpi4b-4gb with a small shard and lenet artifacts."""
    tmp = tmp_path_factory.mktemp("bundle")
    lab = provision(tmp / "lab", "orchard/lab", ["pi7"])
    tar = build_bundle(BOARD, tmp / "dist", device_id="pi7", broker_url="mqtt://10.0.0.2:1883", root="orchard/lab",
                       profiles=PROFILES, model="lenet", dataset="digits", shard=_shard(tmp / "shard.npz"),
                       cache_dir=artifact_cache, secrets=lab.directory)
    return tmp / "dist" / NAME, tar


def test_bundle_carries_the_device_credentials_owner_only(built):
    bundle, tar = built
    cfg = load_device_config(bundle / "device.toml")
    lab = json.loads((bundle.parent.parent / "lab" / "secrets" / "lab.json").read_text())
    assert cfg.credentials == bundle / "credentials.toml" and cfg.run_id == lab["run_id"]
    assert stat.S_IMODE(cfg.credentials.stat().st_mode) == 0o600
    creds = load_credentials(cfg.credentials)
    assert creds.username == "pi7" and creds.hmac_key is not None and len(creds.hmac_key) == 32
    with tarfile.open(tar) as t:
        member = t.getmember(f"{NAME}/credentials.toml")
    assert stat.S_IMODE(member.mode) == 0o600
    # No secret in the world-readable files of the bundle.
    assert creds.password not in (bundle / "device.toml").read_text()
    assert creds.password not in (bundle / "MANIFEST.json").read_text()


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_bundle_holds_runtime_board_config_shard_artifacts_and_scripts(built):
    bundle, tar = built
    assert tar == bundle.parent / f"{NAME}.tar.gz" and tar.is_file()
    files = _files(bundle)
    runtime_src = {f"runtime/{p.relative_to(ROOT / 'runtime').as_posix()}" for p in (ROOT / "runtime").rglob("*.py")
                   if "__pycache__" not in p.parts}
    assert runtime_src <= files
    # The device halves of the methods travel; their server and build halves never do.
    assert "runtime/methods/fjord.py" in files
    assert not any(f.startswith(("server/", "models/", "testbed/")) for f in files)
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    assert {f for f in files if f.startswith("runtime/")} == runtime_src  # .py files only
    assert {f for f in files if f.startswith("firmware_configs/")} == {
        f"firmware_configs/{BOARD}.toml", "firmware_configs/README.md"}
    for name in ("device.toml", "data/shard.npz", "requirements.lock", "install.sh", "build-ort-wheel.sh", UNIT_NAME,
                 "README.md", "MANIFEST.json"):
        assert name in files, name
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    assert set(manifest["artifacts"]) == set(PROFILES)
    assert len(set(manifest["artifacts"].values())) == 2  # dense and width=0.5 are two structures
    for key in manifest["artifacts"].values():
        assert {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "manifest.json"} == {
            f.split("/")[-1] for f in files if f.startswith(f"artifacts/{key}/")}
    # The lock: every board package pinned with the hash of the wheel shipped for the board's
    # Python (Pi OS Bookworm: 3.11) and machine; no ORT (no aarch64 wheel on PyPI), no onnx.
    reqs = [ln for ln in (bundle / "requirements.lock").read_text().splitlines() if ln and not ln.startswith("#")]
    assert [r.split("==")[0] for r in reqs] == ["numpy", "paho-mqtt", "psutil"]
    wheels = {p.name: p for p in (bundle / "wheels").iterdir()}
    for line in reqs:
        name_version, _, digest = line.partition(" --hash=sha256:")
        name, version = name_version.split("==")
        [wheel] = [w for w in wheels if w.lower().startswith(f"{name.replace('-', '_')}-{version}-")]
        assert hashlib.sha256(wheels[wheel].read_bytes()).hexdigest() == digest
        assert wheel.endswith((".any.whl", "-any.whl")) or "aarch64" in wheel, wheel
        assert "cp311" in wheel or "abi3" in wheel or "py3-none" in wheel, wheel
    assert json.loads((bundle / "MANIFEST.json").read_text())["target"] == {
        "python": "3.11", "arch": "aarch64", "ort_wheel": None, "ort_cuda": False}
    with np.load(bundle / "data" / "shard.npz") as shard:
        assert shard["x"].dtype == np.float32 and shard["y"].dtype == np.int64 and len(shard["y"]) == 96
    readme = (bundle / "README.md").read_text()
    for needle in ("systemctl", "journalctl", "python -m runtime --config device.toml --broker mqtt://", "install.sh"):
        assert needle in readme


def test_manifest_hashes_every_file_and_tarball_matches_the_directory(built):
    bundle, tar = built
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert set(listed) == _files(bundle) - {"MANIFEST.json"}
    for path, digest in listed.items():
        assert hashlib.sha256((bundle / path).read_bytes()).hexdigest() == digest, path
    assert "mqtt://10.0.0.2" not in json.dumps(manifest)  # the URL may carry a password
    with tarfile.open(tar) as t:
        members = {m.name: m for m in t.getmembers()}
    assert {n.removeprefix(f"{NAME}/") for n, m in members.items() if m.isfile()} == _files(bundle)
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    assert members[f"{NAME}/install.sh"].mode & 0o111 and not members[f"{NAME}/device.toml"].mode & 0o111


def test_scripts_pass_bash_syntax_check_and_document_the_source_build(built):
    bundle, _ = built
    for script in ("install.sh", "build-ort-wheel.sh"):
        text = (bundle / script).read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
        assert not re.search(r"@[A-Z_]+@", text)  # every template marker filled
        proc = subprocess.run(["bash", "-n", str(bundle / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    install = (bundle / "install.sh").read_text()
    assert "./build.sh --config Release --build_shared_lib --parallel --enable_training_apis --build_wheel" \
           " --skip_tests" in install
    assert "--branch v1.19.2" in install and "BOARD_PYTHON=3.11" in install and "BUNDLE_ARCH=aarch64" in install
    assert "onnxruntime_training*.whl" in install and "dphys-swapfile" in install
    assert "--no-index" in install and "--require-hashes" in install and "--no-deps" in install


def _unit_keys(text: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def test_systemd_unit_is_hardened_notifies_and_caps_memory_from_the_board(built, tmp_path):
    bundle, _ = built
    text = (bundle / UNIT_NAME).read_text()
    keys = _unit_keys(text)
    assert keys["Restart"] == ["always"] and keys["RestartSec"] == ["5"]
    assert keys["ExecStart"] == ["/opt/orchard/venv/bin/python -S -m runtime --config /opt/orchard/device.toml"]
    assert keys["WorkingDirectory"] == ["/opt/orchard"]
    assert "ORCHARD_FIRMWARE_CONFIGS=/opt/orchard/firmware_configs" in keys["Environment"]
    assert keys["WantedBy"] == ["multi-user.target"]
    assert keys["Type"] == ["notify"] and keys["NotifyAccess"] == ["main"] and keys["WatchdogSec"] == ["60"]
    assert keys["NoNewPrivileges"] == ["yes"] and keys["ProtectSystem"] == ["strict"]
    assert keys["PrivateTmp"] == ["yes"] and keys["ProtectHome"] == ["yes"]
    assert keys["ReadWritePaths"] == ["/opt/orchard/artifacts /opt/orchard/state"]
    board = load_board(BOARD)  # RAM less the OS reserve: the same cap the testbed emulates
    assert keys["MemoryMax"] == [f"{board.memory_cap_mb}M"]
    assert keys["MemoryHigh"] == [f"{board.memory_cap_mb * 9 // 10}M"]
    assert int(keys["OOMScoreAdjust"][0]) > 0
    if shutil.which("systemd-analyze") is None:
        return
    # What install.sh --prefix does, against a prefix whose interpreter and state folders exist.
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
    for d in ("artifacts", "state"):
        (tmp_path / d).mkdir()
    unit = text.replace("/opt/orchard", str(tmp_path)).replace("User=orchard", "User=root")
    (tmp_path / UNIT_NAME).write_text(unit)
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / UNIT_NAME)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Unknown key" not in proc.stderr and "Failed to parse" not in proc.stderr, proc.stderr
    # A unit with a typo'd key fails the same check: it can fail.
    bad = tmp_path / "bad.service"
    bad.write_text((tmp_path / UNIT_NAME).read_text().replace("WatchdogSec=60", "WatchdogSec=sixty"))
    proc = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True)
    assert "Failed to parse" in proc.stderr and "sixty" in proc.stderr, proc.stderr


def test_a_bundle_without_a_lab_refuses_to_start_until_provisioned(tmp_path: Path, artifact_cache: Path) -> None:
    build_bundle(BOARD, tmp_path, device_id="pi8", broker_url="mqtt://10.0.0.2:1883", root="orchard/lab",
                 profiles=["dense"], model=None, dataset=None, shard=None, cache_dir=artifact_cache)
    bundle = tmp_path / f"orchard-{BOARD}-pi8"
    assert not (bundle / "credentials.toml").exists()
    cfg = load_device_config(bundle / "device.toml")  # loads: install.sh checks the runtime with it
    with pytest.raises(ConfigError, match="run_id is 'unprovisioned'"):
        cfg.check_provisioned()  # the agent's first step: it refuses to start


def test_device_toml_loads_with_the_bundled_board(built, monkeypatch):
    bundle, _ = built
    monkeypatch.setenv(ENV_CONFIG_DIR, str(bundle / "firmware_configs"))
    cfg = load_device_config(bundle / "device.toml")
    assert (cfg.device_id, cfg.board, cfg.profiles) == ("pi7", BOARD, tuple(PROFILES))
    assert (cfg.broker_url, cfg.root) == ("mqtt://10.0.0.2:1883", "orchard/lab")
    assert cfg.shard == bundle / "data" / "shard.npz" and cfg.shard.is_file()
    assert cfg.artifact_cache == bundle / "artifacts" and cfg.artifact_cache.is_dir()
    assert load_board(cfg.board).path.endswith(f"{BOARD}.toml")


BLOCKED = ["torch", "onnx", "sklearn", "scipy", "server", "testbed", "models"]

# Runs with `python -I` (no cwd, no PYTHONPATH, no user site on sys.path) and the bundle put on
# sys.path by hand; the venv's editable install of the repo is unhooked, so only the bundle's
# own copy of `runtime` can be imported, next to the venv's numpy/onnxruntime/paho/psutil.
PROBE = textwrap.dedent(
    """
    import importlib.abc, json, math, os, sys
    BLOCKED = set(sys.argv[1].split(","))
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked on a board: {name}")
            return None
    sys.meta_path[:] = [Refuse()] + [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    sys.path.insert(0, os.getcwd())
    import numpy as np
    import runtime, runtime.agent, runtime.trainer, runtime.__main__
    from runtime.board import load_board
    from runtime.device_config import load_device_config
    from runtime.manifest import read_manifest
    from runtime.trainer import Trainer, TrainConfig
    cfg = load_device_config("device.toml")
    board = load_board(cfg.board)  # by name: firmware_configs/ next to the bundled runtime/
    with np.load(cfg.shard) as shard:
        x, y = shard["x"], shard["y"]
    trained = {}
    for entry in sorted(cfg.artifact_cache.iterdir()):
        t = Trainer(entry, threads=1)
        r = t.train(None, x, y, TrainConfig(steps=6, batch_size=16, lr=0.05))
        assert r.steps == 6 and all(math.isfinite(v) for v in r.loss_per_step), r
        trained[entry.name] = {"params": t.layout.total, "loss": r.loss_per_step[-1],
                               "model": read_manifest(entry).model}
    print(json.dumps({
        "runtime_file": runtime.__file__, "board": board.name, "trained": trained,
        "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED), "path": sys.path,
    }))
    """
)


def test_extracted_bundle_trains_with_board_packages_only(built, tmp_path):
    bundle, tar = built
    with tarfile.open(tar) as t:
        t.extractall(tmp_path, filter="data")
    extracted = tmp_path / NAME
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", ENV_CONFIG_DIR)}
    proc = subprocess.run([sys.executable, "-I", "-c", PROBE, ",".join(BLOCKED)], cwd=extracted, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["runtime_file"]).resolve() == (extracted / "runtime" / "__init__.py").resolve()
    assert str(ROOT) not in out["path"] and "" not in out["path"][1:]
    assert out["loaded"] == [] and out["board"] == BOARD
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    assert set(out["trained"]) == set(manifest["artifacts"].values())
    params = sorted(v["params"] for v in out["trained"].values())
    assert params[0] < params[1] and {v["model"] for v in out["trained"].values()} == {"lenet"}


def _run_install(bundle: Path, tmp_path: Path, *args: str, arch: str = "aarch64") -> subprocess.CompletedProcess[str]:
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "uname").write_text(f"#!/bin/sh\necho {arch}\n")
    (shim / "uname").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(bundle / "install.sh"), "--no-service", "--prefix", str(tmp_path / "prefix"),
                           *args], env=env, capture_output=True, text=True, timeout=60)


def test_install_sh_without_a_wheel_on_aarch64_prints_the_build_and_changes_nothing(built, tmp_path):
    bundle, _ = built
    proc = _run_install(bundle, tmp_path, "--python", sys.executable)
    assert proc.returncode != 0
    assert "--enable_training_apis" in proc.stderr and "--branch v1.19.2" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("install.sh: error: no onnxruntime-training wheel for aarch64")
    assert not (tmp_path / "prefix").exists()


def test_install_sh_refuses_a_damaged_bundle_and_an_old_python(built, tmp_path):
    bundle, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with (copy / "runtime" / "agent.py").open("a") as f:
        f.write("# torn\n")
    proc = _run_install(copy, tmp_path, "--python", sys.executable)
    assert proc.returncode != 0 and "damaged" in proc.stderr and "runtime/agent.py" in proc.stderr
    # The wheels are locked for the board's CPython: another interpreter, or another machine, is
    # refused with what to do, before anything changes.
    other = tmp_path / "python3.9"
    other.write_text("#!/bin/sh\necho 3.9\n")
    other.chmod(0o755)
    proc = _run_install(bundle, tmp_path, "--python", str(other))
    assert proc.returncode != 0 and "locked for CPython 3.11" in proc.stderr and "--board-python 3.9" in proc.stderr
    proc = _run_install(bundle, tmp_path, "--python", sys.executable, arch="armv7l")
    assert proc.returncode != 0 and "the bundle's wheels are for aarch64" in proc.stderr
    assert not (tmp_path / "prefix").exists()


def test_flash_dry_run_returns_scp_then_remote_install(built, monkeypatch, tmp_path):
    _, tar = built
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("dry run must not run anything"))
    cmds = flash(tar, "pi@raspberrypi.local", dry_run=True)
    d = "/tmp/orchard-flash.XXXXXXXX"  # mktemp -d's private folder
    assert cmds == [
        ["ssh", "pi@raspberrypi.local", f"mktemp -d {d}"],
        ["scp", str(tar), f"pi@raspberrypi.local:{d}/"],
        ["ssh", "-t", "pi@raspberrypi.local",
         f"cd {d} && tar xzf {NAME}.tar.gz && sudo bash {d}/{NAME}/install.sh; status=$?; rm -rf {d}; exit $status"],
    ]
    wheel = fake_ort_wheel(tmp_path / "onnxruntime_training-1.19.2-cp311-cp311-linux_aarch64.whl")
    cmds = flash(tar, "pi5", ssh="ssh -p 2222", scp="scp -P 2222", dry_run=True, wheel=wheel,
                 install_args=["--broker", "mqtt://10.0.0.2:1883"])
    assert cmds[1] == ["scp", "-P", "2222", str(tar), str(wheel), f"pi5:{d}/"]
    assert cmds[2][:4] == ["ssh", "-p", "2222", "-t"]
    assert f"install.sh --broker mqtt://10.0.0.2:1883 --wheel {d}/{wheel.name}; status=$?" in cmds[2][-1]


def test_flash_copies_into_the_private_folder_mktemp_made(built, monkeypatch):
    _, tar = built
    calls: list[list[str]] = []

    def run(cmd, **kw):
        calls.append(cmd)
        out = "/tmp/orchard-flash.Ab3dE6gH\n" if cmd[-1].startswith("mktemp") else ""
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    flash(tar, "pi", dry_run=False)
    assert calls[1][-1] == "pi:/tmp/orchard-flash.Ab3dE6gH/" and "cd /tmp/orchard-flash.Ab3dE6gH &&" in calls[2][-1]
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, stdout="/tmp\n"))
    with pytest.raises(OrchardError, match="gave no private folder"):
        flash(tar, "pi", dry_run=False)


def test_flash_rejects_missing_or_foreign_tarballs_and_bad_hosts(built, tmp_path):
    _, tar = built
    with pytest.raises(ConfigError, match="not found"):
        flash(tmp_path / "nope.tar.gz", "pi", dry_run=True)
    with pytest.raises(ConfigError, match="bad SSH host"):
        flash(tar, "-oProxyCommand=x", dry_run=True)
    foreign = tmp_path / "foreign.tar.gz"
    with tarfile.open(foreign, "w:gz") as t:
        t.add(__file__, arcname="x/readme.txt")
    with pytest.raises(ConfigError, match="not a bundle"):
        flash(foreign, "pi", dry_run=True)


def _fake_engine(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "engine.log"
    (bin_dir / "docker").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {log}\n')
    (bin_dir / "docker").chmod(0o755)
    binfmt = tmp_path / "qemu-aarch64"
    binfmt.write_text("enabled\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "BINFMT_QEMU": str(binfmt), "WORK": str(tmp_path)}
    return env, log


@pytest.mark.parametrize(("args", "image", "jetson"), [
    ([], "docker.io/library/python:3.11-bookworm", "0"),                 # the bundle's board: Pi OS, 3.11
    (["--python", "3.10"], "docker.io/library/python:3.10-bullseye", "0"),
    (["--jetson", "--python", "3.8"], "nvcr.io/nvidia/l4t-jetpack:r35.4.1", "1"),
    (["--jetson", "--python", "3.10"], "nvcr.io/nvidia/l4t-jetpack:r36.3.0", "1"),
])
def test_build_ort_wheel_container_path_runs_the_native_build_in_an_arm64_image(built, tmp_path, args, image, jetson):
    bundle, _ = built
    env, log = _fake_engine(tmp_path)
    proc = subprocess.run(["bash", str(bundle / "build-ort-wheel.sh"), "--container", *args], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv = log.read_text().splitlines()
    assert argv[:4] == ["run", "--rm", "--platform", "linux/arm64"] and image in argv
    assert f"ORCHARD_JETSON={jetson}" in argv and f"{bundle}:/bundle" in argv
    assert argv[-1].endswith("bash /bundle/build-ort-wheel.sh --python " + (args[-1] if args else "3.11"))


def test_build_ort_wheel_refuses_what_cannot_work(built, tmp_path):
    bundle, _ = built
    env, _ = _fake_engine(tmp_path)
    for args, want in ((["--container", "--jetson", "--python", "3.11"], "JetPack 5 ships 3.8, JetPack 6 ships 3.10"),
                       (["--python", "3.6"], "the runtime runs on CPython 3.8-3.12"),
                       (["--container"], "no QEMU for aarch64 registered")):
        run_env = {**env, "BINFMT_QEMU": str(tmp_path / "absent")} if want.startswith("no QEMU") else env
        proc = subprocess.run(["bash", str(bundle / "build-ort-wheel.sh"), *args], env=run_env, capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode != 0 and want in proc.stderr, (args, proc.stderr)
