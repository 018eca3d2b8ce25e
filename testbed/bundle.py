"""Board bundles: everything one real board needs to join a campaign, and a helper to flash it.

A bundle `orchard-<board>-<device>/` (and its `.tar.gz`) holds the runtime's source, the board's
config, a filled-in `device.toml` with paths relative to itself, the data shard, prebuilt
training artifacts, the board's wheels with their hashed `requirements.lock` (for the board's
Python and architecture, testbed/board_wheels.py; and the onnxruntime-training wheel when there
is one), `install.sh`, the systemd unit, `build-ort-wheel.sh` and a README, with a
`MANIFEST.json` of SHA-256 sums that `install.sh` checks before it touches the board.
Bundling artifacts only saves the first download: the server pushes any artifact a device lacks.
The shell scripts, unit and README are templates in testbed/bundle_templates/ (`@NAME@` markers);
the scripts are syntax-checked and partly run by tests/unit/test_bundle.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import numpy.typing as npt

from runtime import __version__
from runtime.board import BoardConfig, configs_dir, load_board
from runtime.credentials import load_credentials, write_private
from runtime.device_config import UNPROVISIONED
from runtime.errors import ConfigError, OrchardError
from runtime.manifest import ARTIFACT_FILES, MANIFEST
from runtime.methods import device_profile
from runtime.mqtt import parse_broker_url
from runtime.profile import parse_profile, split_variant
from runtime.protocol import ID_PATTERN
from testbed.board_wheels import ORT_VERSION, OrtWheel, board_lock, check_ort_wheel
from testbed.prepare import write_toml

RUNTIME_SRC = Path(__file__).resolve().parent.parent / "runtime"
DEFAULT_PREFIX = "/opt/orchard"  # install.sh --prefix rewrites it in the unit it installs
UNIT_NAME = "orchard-device.service"
LOCK_FILE = "requirements.lock"
MIN_BOARD_PYTHON = (3, 8)
BUNDLE_MANIFEST = "MANIFEST.json"
TEMPLATES = Path(__file__).resolve().parent / "bundle_templates"
SCRIPTS = ("install.sh", "build-ort-wheel.sh")
CREDENTIALS = "credentials.toml"
Shard = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


def _template(name: str) -> str:
    """A text in testbed/bundle_templates/, with `@NAME@` markers that `_render` fills."""
    return (TEMPLATES / name).read_text()


_HASH_CHECK = """import hashlib, json, os, sys
bad = [f["path"] for f in json.load(open("MANIFEST.json"))["files"] if not os.path.isfile(f["path"])
       or hashlib.sha256(open(f["path"], "rb").read()).hexdigest() != f["sha256"]]
sys.exit("damaged or missing: " + ", ".join(bad[:5]) if bad else 0)"""

_BUILD_CMDS = f"""  git clone --recursive --depth 1 --branch v{ORT_VERSION} https://github.com/microsoft/onnxruntime.git
  cd onnxruntime
  ./build.sh --config Release --build_shared_lib --parallel --enable_training_apis --build_wheel --skip_tests
  cp build/Linux/Release/dist/onnxruntime_training*.whl @HERE@/"""

INSTALL_SH = _template("install.sh")

BUILD_ORT_SH = _template("build-ort-wheel.sh")

UNIT = _template("orchard-device.service")

README = _template("README.md")


def _render(template: str, **values: str) -> str:
    text = template
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
    assert not left, f"template markers left unfilled: {left}"  # a bug here, not a user error
    return text


def _read_shard(path: Path) -> Shard:
    if not path.is_file():
        raise ConfigError(f"shard file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"shard {path}: not an .npz with arrays x and y ({exc})") from None
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise ConfigError(f"shard {path}: want x (N, C, H, W) and y (N,), N > 0; got {x.shape} and {y.shape}")
    if not (np.issubdtype(x.dtype, np.floating) and np.issubdtype(y.dtype, np.integer)):
        raise ConfigError(f"shard {path}: want float x and integer y, got {x.dtype} and {y.dtype}")
    return x.astype(np.float32), y.astype(np.int64)


def _lab_credentials(secrets: Path | None, device_id: str | None) -> tuple[str, str] | None:
    """(run id, the device's credentials file text) from a lab's secrets folder."""
    if secrets is None:
        return None
    if device_id is None:
        raise ConfigError("--secrets needs --device-id: credentials belong to one device")
    path = Path(secrets) / f"{device_id}.toml"
    load_credentials(path)  # refuses a missing, unreadable or world-readable file
    try:
        run_id = str(json.loads((Path(secrets) / "lab.json").read_text())["run_id"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{secrets}: not a lab's secrets folder (lab.json: {exc})") from None
    return run_id, path.read_text()


def _build_artifacts(model: str, dataset: str, data_root: str | None, profiles: Sequence[str], optimizer: str,
                     cache_dir: Path | None, shard: Shard | None) -> dict[str, Path]:
    """Artifact directory per profile, built the way testbed/prepare.py builds a run's."""
    from models.artifacts import artifacts_for
    from models.datasets import load_dataset

    ds = load_dataset(dataset, data_root)  # only for the input shape and class count
    if shard is not None:
        x, y = shard
        if tuple(x.shape[1:]) != ds.input_shape or int(y.max()) >= ds.num_classes or int(y.min()) < 0:
            raise ConfigError(f"shard samples {tuple(x.shape[1:])} / labels {int(y.min())}..{int(y.max())} do not fit"
                              f" {dataset} ({ds.input_shape}, {ds.num_classes} classes)")
    # Only slice profiles name their artifacts by themselves; a method that needs its campaign's
    # keys to know them (FjORD's widths) gets them from the server at its first task.
    structural = [p for p in profiles if _is_structural(p)]
    sets = artifacts_for(model, ds.input_shape, ds.num_classes, structural, optimizer=optimizer, cache_dir=cache_dir)
    return {p: sets[p].directory for p in structural}


def _is_structural(profile: str) -> bool:
    try:
        parse_profile(split_variant(profile)[0])  # a graph variant (`@fd`) does not change the structure
    except ConfigError:
        return False
    return True


def _file_list(root: Path) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        if rel != BUNDLE_MANIFEST:
            out.append({"path": rel, "bytes": p.stat().st_size,
                        "sha256": hashlib.sha256(p.read_bytes()).hexdigest()})
    return out


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Root-owned entries: `sudo tar x` on the board must not hand files to the builder's uid.
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = 0o755 if info.isdir() or info.name.endswith(SCRIPTS) else 0o644
    if info.name.endswith(f"/{CREDENTIALS}"):
        info.mode = 0o600  # the device's login and HMAC key: its owner only (runtime/credentials.py)
    return info


def build_bundle(board: str, out_dir: Path, *, device_id: str | None, broker_url: str, root: str,
                 profiles: Sequence[str], model: str | None, dataset: str | None, shard: Path | None,
                 python: str = "python3", force: bool = False, optimizer: str = "sgd",
                 cache_dir: Path | None = None, data_root: str | None = None, ort_wheel: Path | None = None,
                 board_python: str | None = None, arch: str | None = None, pareto: Path | None = None,
                 secrets: Path | None = None) -> Path:
    """Build `out_dir/orchard-<board>-<device>/` and its `.tar.gz`; return the tarball's path
    (what `flash` takes). `dataset` (default digits) sets the artifacts' input shape and classes.
    `board_python` / `arch` override the board config's [runtime] (the OS's CPython, its machine);
    `ort_wheel` is a built onnxruntime-training wheel, checked against them before anything is copied.
    `pareto` (a DISTREAL front from `orchard dse`) ships as pareto.json with one artifact per
    vector. `secrets`: a lab's secrets folder (testbed/lab_secrets.py); the device's credentials and
    the run id come from it. Without one the device cannot log in until credentials.toml is put in
    place. Raises ConfigError naming the bad input; nothing is left half-written."""
    cfg = load_board(board)
    py, machine = _board_target(cfg, board_python, arch)
    wheel = check_ort_wheel(Path(ort_wheel), py, machine) if ort_wheel is not None else None
    if device_id is not None and not ID_PATTERN.fullmatch(device_id):
        raise ConfigError(f"device id {device_id!r} must be 1-64 of A-Z a-z 0-9 . _ -")
    parse_broker_url(broker_url)
    if not root or any(c in root for c in "+#") or root.startswith("/") or root.endswith("/"):
        raise ConfigError(f"topic root {root!r} must be non-empty, without + or #, and not start or end with /")
    if not python.strip() or any(c.isspace() or c in "'\"$`\\" for c in python):
        raise ConfigError(f"python interpreter {python!r} must be a plain command name or path")
    canonical = list(dict.fromkeys(device_profile(p) for p in (profiles or ["dense"])))
    if dataset is not None and model is None:
        raise ConfigError("a dataset only matters with a model (it sets the artifacts' input shape and classes)")
    arrays = _read_shard(Path(shard)) if shard is not None else None
    secret = _lab_credentials(secrets, device_id)
    # Same rule as load_board: a path-like argument is a file, anything else a name in the configs dir.
    is_path = board.endswith(".toml") or "/" in board or os.sep in board
    board_src = Path(board) if is_path else configs_dir() / f"{cfg.name}.toml"
    name = f"orchard-{cfg.name}-{device_id or 'device'}"
    out = Path(out_dir)
    target, tar_path = out / name, out / f"{name}.tar.gz"
    if (target.exists() or tar_path.exists()) and not force:
        raise ConfigError(f"bundle {target} exists; pass --force to replace it")
    artifacts = (_build_artifacts(model, dataset or "digits", data_root, canonical, optimizer, cache_dir, arrays)
                 if model is not None else {})
    front_text = None
    if pareto is not None:
        from runtime.methods.distreal import SPEC as DISTREAL
        from runtime.methods.distreal import load_front

        front = load_front(str(pareto))
        if model is not None and front["model"] != model:
            raise ConfigError(f"Pareto file {pareto} is for model {front['model']!r}, not {model!r}")
        vectors = DISTREAL.artifact_profiles("dense", DISTREAL.params({"front": front}))
        artifacts.update(_build_artifacts(front["model"], dataset or "digits", data_root, vectors, optimizer,
                                          cache_dir, arrays))
        front_text = Path(pareto).read_text()
    # PyPI has onnxruntime-training-cpu for x86_64 only; an aarch64 board needs a built --ort-wheel.
    lock, wheels = board_lock(py, machine, _wheel_cache(), with_ort=wheel is None and machine == "x86_64")
    if wheel is not None:
        lock += wheel.lock_line + "\n"
        wheels = [*wheels, wheel.path]

    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    stage.chmod(0o755)  # mkdtemp makes it 0700
    try:
        wheel_info = _add_wheels(stage, lock, wheels, py, machine, wheel)
        _fill(stage, name, cfg, board_src, device_id, broker_url, root, canonical, model,
              dataset, arrays, artifacts, python, wheel_info, secret)
        if front_text is not None:
            (stage / "pareto.json").write_text(front_text)
        if force:
            shutil.rmtree(target, ignore_errors=True)
        os.rename(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    tmp_tar = out / f".{name}.tar.gz.tmp"
    with tarfile.open(tmp_tar, "w:gz") as tar:
        tar.add(target, arcname=name, filter=_tar_filter)
    os.replace(tmp_tar, tar_path)
    return tar_path


def _board_target(cfg: BoardConfig, board_python: str | None, arch: str | None) -> tuple[str, str]:
    py = board_python or cfg.runtime.python
    if not re.fullmatch(r"3\.\d{1,2}", py):
        raise ConfigError(f"--board-python {py!r}: want a CPython version like 3.11")
    if tuple(map(int, py.split("."))) < MIN_BOARD_PYTHON:
        raise ConfigError(f"board {cfg.name} runs CPython {py} ({cfg.os}); the runtime needs 3.8+: install a "
                          f"newer Python on the board and pass --board-python (e.g. 3.8)")
    machine = arch or cfg.runtime.arch
    if machine not in ("aarch64", "x86_64"):
        raise ConfigError(f"--arch {machine!r}: want aarch64 or x86_64")
    return py, machine


def _wheel_cache() -> Path:
    env = os.environ.get("ORCHARD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "orchard"


def _add_wheels(stage: Path, lock: str, wheels: list[Path], py: str, machine: str,
                wheel: OrtWheel | None) -> dict[str, object]:
    """Copy the wheels and the lock in; return what the manifest and install.sh say of them."""
    (stage / "wheels").mkdir()
    for w in wheels:
        shutil.copyfile(w, stage / "wheels" / w.name)
    (stage / LOCK_FILE).write_text(lock)
    ort = next((w.name for w in wheels if w.name.lower().startswith("onnxruntime")), None)
    return {"python": py, "arch": machine, "ort_wheel": ort, "ort_cuda": bool(wheel and wheel.cuda)}


def _fill(stage: Path, name: str, cfg: BoardConfig, board_src: Path, device_id: str | None,
          broker_url: str, root: str, profiles: list[str], model: str | None, dataset: str | None,
          arrays: Shard | None, artifacts: dict[str, Path], python: str, target: dict[str, object],
          secret: tuple[str, str] | None) -> None:
    board, description = cfg.name, cfg.description
    for src in sorted(RUNTIME_SRC.rglob("*.py")):
        if "__pycache__" not in src.parts:
            dst = stage / "runtime" / src.relative_to(RUNTIME_SRC)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    (stage / "firmware_configs").mkdir()
    shutil.copyfile(board_src, stage / "firmware_configs" / f"{board}.toml")
    if (board_src.parent / "README.md").is_file():  # the conventions behind the numbers
        shutil.copyfile(board_src.parent / "README.md", stage / "firmware_configs" / "README.md")
    if arrays is not None:
        (stage / "data").mkdir()
        np.savez(stage / "data" / "shard.npz", x=arrays[0], y=arrays[1])
    keys: dict[str, str] = {}
    for profile, src_dir in artifacts.items():
        keys[profile] = src_dir.name
        dst_dir = stage / "artifacts" / src_dir.name
        if not dst_dir.exists():  # two profiles of one structure share an entry
            dst_dir.mkdir(parents=True)
            for f in (*ARTIFACT_FILES, MANIFEST):
                shutil.copyfile(src_dir / f, dst_dir / f)
    # The board is named, not given as a path: load_board resolves names in the firmware_configs
    # next to runtime/ (or $ORCHARD_FIRMWARE_CONFIGS), whereas a relative path would be taken
    # from the working directory, not from device.toml.
    write_toml(stage / "device.toml", {
        "device": {"id": device_id or "device", "board": board, "shard": "data/shard.npz",
                   "artifact_cache": "artifacts", "profiles": profiles, "threads": 0, "telemetry_hz": 1.0},
        "broker": {"url": broker_url, "root": root, "keepalive_s": 10, "credentials": CREDENTIALS,
                   "run_id": secret[0] if secret else UNPROVISIONED},
    })
    if secret is not None:
        write_private(stage / CREDENTIALS, secret[1])
    header = f"# Device config for {name} (format: runtime/device_config.py). Paths are relative to this file.\n"
    (stage / "device.toml").write_text(header + (stage / "device.toml").read_text())
    common = {"BOARD": board, "DEVICE": device_id or "(hostname)", "ORT_VERSION": ORT_VERSION, "UNIT": UNIT_NAME}
    build_cmds = _BUILD_CMDS.replace("@HERE@", "$HERE")
    (stage / "install.sh").write_text(_render(
        INSTALL_SH, **common, PREFIX=DEFAULT_PREFIX, PYTHON=shlex.quote(python), HASH_CHECK=_HASH_CHECK,
        BUILD_CMDS=build_cmds, ID_FROM_HOSTNAME="0" if device_id else "1", BOARD_PYTHON=str(target["python"]),
        ARCH=str(target["arch"]), ORT_WHEEL=shlex.quote(str(target["ort_wheel"] or ""))))
    (stage / "build-ort-wheel.sh").write_text(_render(BUILD_ORT_SH, ORT_VERSION=ORT_VERSION, PYTHON=python,
                                                      BOARD_PYTHON=str(target["python"])))
    (stage / UNIT_NAME).write_text(_render(
        UNIT, **common, PREFIX=DEFAULT_PREFIX, RAM_MB=str(cfg.ram_mb), OS_RESERVE_MB=str(cfg.os_reserve_mb),
        MEMORY_MAX_MB=str(cfg.memory_cap_mb), MEMORY_HIGH_MB=str(cfg.memory_cap_mb * 9 // 10)))
    shard_note = ("local training data, x float32 (N, C, H, W), y int64 (N,)" if arrays is not None else
                  "not bundled: put the device's data here (x float32 (N, C, H, W), y int64 (N,))")
    art_note = (f"prebuilt {model} artifacts for {', '.join(f'{p} ({k})' for p, k in keys.items())}"
                if keys else "none bundled; the server pushes what the device lacks")
    (stage / "README.md").write_text(_render(
        README, **common, PREFIX=DEFAULT_PREFIX, NAME=name, VERSION=__version__, BOARD_DESC=description,
        CREATED=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), SHARD=shard_note, ARTIFACTS=art_note,
        ROOT=root, BOARD_PYTHON=str(target["python"]), ARCH=str(target["arch"])))
    for script in SCRIPTS:
        (stage / script).chmod(0o755)
    # No broker URL here: it may carry a password, and device.toml already has it.
    (stage / BUNDLE_MANIFEST).write_text(json.dumps({
        "format": 1, "orchard": __version__, "board": board, "device_id": device_id, "root": root,
        "profiles": profiles, "model": model, "dataset": (dataset or "digits") if model else None,
        "artifacts": keys, "onnxruntime_training": ORT_VERSION, "target": target, "files": _file_list(stage),
    }, indent=1) + "\n")


def flash(bundle_tar: Path, host: str, *, ssh: str = "ssh", scp: str = "scp", dry_run: bool = False,
          wheel: Path | None = None, install_args: Sequence[str] = ()) -> list[list[str]]:
    """Copy a bundle tarball (and optionally an onnxruntime-training wheel) to `host` over SSH
    and run its install.sh there with sudo. Returns the commands; with dry_run only returns them.
    `ssh`/`scp` may carry options ("ssh -p 2222"); `install_args` go to install.sh."""
    tar_path = Path(bundle_tar)
    if not tar_path.is_file():
        raise ConfigError(f"bundle tarball not found: {tar_path}")
    if not host or host.startswith("-") or any(c.isspace() for c in host):
        raise ConfigError(f"bad SSH host {host!r}; expected user@host or an ssh config name")
    if wheel is not None and not Path(wheel).is_file():
        raise ConfigError(f"--wheel {wheel}: no such file")
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            names = tar.getnames()
            top = names[0].split("/")[0] if names else ""
            member = tar.extractfile(f"{top}/{BUNDLE_MANIFEST}") if f"{top}/{BUNDLE_MANIFEST}" in names else None
            manifest = json.loads(member.read()) if member is not None else {}
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise ConfigError(f"{tar_path} is not a bundle tarball: {exc}") from None
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", top) or f"{top}/install.sh" not in names:
        raise ConfigError(f"{tar_path} is not a bundle tarball: no {top}/install.sh")
    target = manifest.get("target") if isinstance(manifest, dict) else None
    if wheel is not None and isinstance(target, dict):  # the same checks as `orchard bundle --ort-wheel`
        check_ort_wheel(Path(wheel), str(target.get("python")), str(target.get("arch")), flag="--wheel")
    # A private folder (mktemp -d: mode 0700, unguessable name) rather than /tmp itself: another
    # user on the board could otherwise swap the tarball or install.sh between copy and sudo.
    make_dir = [*shlex.split(ssh), host, "mktemp -d /tmp/orchard-flash.XXXXXXXX"]
    private = FLASH_DIR_PLACEHOLDER
    if not dry_run:
        proc = subprocess.run(make_dir, check=False, capture_output=True, text=True)
        private = proc.stdout.strip()
        if proc.returncode != 0 or not re.fullmatch(r"/tmp/orchard-flash\.[A-Za-z0-9]{8}", private):
            raise OrchardError(f"flash: `{shlex.join(make_dir)}` gave no private folder "
                               f"(status {proc.returncode}, output {private[:80]!r})")
    extra = list(install_args)
    sources = [str(tar_path)]
    if wheel is not None:
        sources.append(str(wheel))
        extra += ["--wheel", f"{private}/{Path(wheel).name}"]
    q = shlex.quote(private)
    remote = (f"cd {q} && tar xzf {shlex.quote(tar_path.name)}"
              f" && sudo bash {shlex.quote(f'{private}/{top}/install.sh')}"
              + "".join(f" {shlex.quote(a)}" for a in extra)
              + f"; status=$?; rm -rf {q}; exit $status")
    # -t: sudo on the board may need to ask for a password.
    commands = [make_dir, [*shlex.split(scp), *sources, f"{host}:{private}/"], [*shlex.split(ssh), "-t", host, remote]]
    if not dry_run:
        for cmd in commands[1:]:
            rc = subprocess.run(cmd, check=False).returncode
            if rc != 0:
                raise OrchardError(f"flash: `{shlex.join(cmd)}` exited with status {rc}")
    return commands


FLASH_DIR_PLACEHOLDER = "/tmp/orchard-flash.XXXXXXXX"  # what a dry run shows for the folder mktemp makes
