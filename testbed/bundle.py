"""Board bundles: everything one real board needs to join a campaign, and a helper to flash it.

A bundle `orchard-<board>-<device>/` (and its `.tar.gz`) holds the runtime's source, the board's
config, a filled-in `device.toml` with paths relative to itself, the data shard, prebuilt
training artifacts, `install.sh`, the systemd unit, `build-ort-wheel.sh` and a README, with a
`MANIFEST.json` of SHA-256 sums that `install.sh` checks before it touches the board.
Bundling artifacts only saves the first download: the server pushes any artifact a device lacks.
The shell scripts and README are templates in this file (`@NAME@` markers) so a bundle is built
from one module; the scripts are syntax-checked and partly run by tests/unit/test_bundle.py.
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
from runtime.board import configs_dir, load_board
from runtime.errors import ConfigError, OrchardError
from runtime.manifest import ARTIFACT_FILES, MANIFEST
from runtime.mqtt import parse_broker_url
from runtime.profile import parse_profile
from runtime.protocol import ID_PATTERN
from testbed.prepare import write_toml

RUNTIME_SRC = Path(__file__).resolve().parent.parent / "runtime"
DEFAULT_PREFIX = "/opt/orchard"  # install.sh --prefix rewrites it in the unit it installs
UNIT_NAME = "orchard-device.service"
ORT_VERSION = "1.19.2"  # the last onnxruntime-training release (platform.md §5)
# Everything the runtime imports except onnxruntime-training, which has no aarch64 wheel and is
# installed by install.sh. numpy<2 follows pyproject.toml (ORT 1.19.2 was built against 1.x).
REQUIREMENTS = ("numpy>=1.24,<2", "paho-mqtt>=2,<3", "psutil>=5.9")
BUNDLE_MANIFEST = "MANIFEST.json"
SCRIPTS = ("install.sh", "build-ort-wheel.sh")
Shard = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]

_HASH_CHECK = """import hashlib, json, os, sys
bad = [f["path"] for f in json.load(open("MANIFEST.json"))["files"] if not os.path.isfile(f["path"])
       or hashlib.sha256(open(f["path"], "rb").read()).hexdigest() != f["sha256"]]
sys.exit("damaged or missing: " + ", ".join(bad[:5]) if bad else 0)"""

_BUILD_CMDS = f"""  git clone --recursive --depth 1 --branch v{ORT_VERSION} https://github.com/microsoft/onnxruntime.git
  cd onnxruntime
  ./build.sh --config Release --build_shared_lib --parallel --enable_training_apis --build_wheel --skip_tests
  cp build/Linux/Release/dist/onnxruntime_training*.whl @HERE@/"""

INSTALL_SH = r"""#!/usr/bin/env bash
# Install the Orchard device agent from this bundle (@BOARD@, device @DEVICE@).
# Usage: sudo bash install.sh [--prefix DIR] [--python PY] [--wheel FILE] [--broker URL] [--user NAME] [--no-service]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PREFIX=@PREFIX@
PYTHON=@PYTHON@
WHEEL=""
BROKER=""
RUN_USER=orchard
SERVICE=1
ORT_VERSION=@ORT_VERSION@
ID_FROM_HOSTNAME=@ID_FROM_HOSTNAME@  # 1: the bundle names no device; use this board's hostname

die() { echo "install.sh: error: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
    --wheel) WHEEL="${2:?--wheel needs a file}"; shift 2 ;;
    --broker) BROKER="${2:?--broker needs a URL}"; shift 2 ;;
    --user) RUN_USER="${2:?--user needs a name}"; shift 2 ;;
    --no-service) SERVICE=0; shift ;;
    -h|--help) sed -n '2,3p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install Python >= 3.11 or pass --python"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is $("$PYTHON" -V 2>&1); the runtime needs Python >= 3.11 (pass --python python3.11)"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || die "$PYTHON has no venv; run: sudo apt-get install python3-venv"
(cd "$HERE" && "$PYTHON" -c '@HASH_CHECK@') || die "the bundle in $HERE is damaged; copy the tarball again"
if [ "$SERVICE" = 1 ] && [ "$(id -u)" != 0 ]; then
  die "installing the systemd unit needs root: run with sudo, or pass --no-service --prefix ~/orchard"
fi

# Decide where onnxruntime-training comes from before changing anything, so a board without
# a wheel is left untouched. Python wheels of the training build stopped at 1.19.2 and were
# never published for Linux aarch64.
ort_ok() {
  "$1" -c 'import onnxruntime as o, os, sys
api = os.path.join(os.path.dirname(o.__file__), "training", "api", "module.py")
sys.exit(not (o.__version__.startswith("'"$ORT_VERSION"'") and os.path.isfile(api)))' 2>/dev/null
}
if [ -z "$WHEEL" ]; then
  for w in "$HERE"/onnxruntime_training*.whl; do if [ -f "$w" ]; then WHEEL="$w"; fi; done
fi
ARCH="$(uname -m)"
ORT_SOURCE=""
if [ -n "$WHEEL" ]; then
  [ -f "$WHEEL" ] || die "wheel $WHEEL not found"
  ORT_SOURCE="$WHEEL"
elif [ -x "$PREFIX/venv/bin/python" ] && ort_ok "$PREFIX/venv/bin/python"; then
  echo "onnxruntime-training $ORT_VERSION already installed in $PREFIX/venv"
elif [ "$ARCH" = x86_64 ]; then
  ORT_SOURCE="onnxruntime-training-cpu==$ORT_VERSION"
else
  cat >&2 <<EOF
There is no onnxruntime-training $ORT_VERSION wheel for $ARCH. Build one from source, once per
Python version (it serves every board of that kind), on the board or in an $ARCH container:
@BUILD_CMDS@
(or run: bash $HERE/build-ort-wheel.sh, which also installs cmake >= 3.26 and checks the wheel).
It needs about 6 GB of RAM + swap and takes hours on a Pi 4. Enlarge swap on Pi OS first:
  sudo dphys-swapfile swapoff
  sudo sed -i 's/^#\?CONF_SWAPSIZE=.*/CONF_SWAPSIZE=4096/; s/^#\?CONF_MAXSWAP=.*/CONF_MAXSWAP=4096/' /etc/dphys-swapfile
  sudo dphys-swapfile setup && sudo dphys-swapfile swapon
and pass --parallel 2 on a 4 GB board. Then run install.sh again (or pass --wheel FILE).
EOF
  die "no onnxruntime-training wheel for $ARCH: build it as shown above, then run install.sh again"
fi

set_key() {  # set_key KEY VALUE: rewrite one `key = ...` line of the installed device.toml
  "$PYTHON" - "$PREFIX/device.toml" "$1" "$2" <<'EOF'
import json, re, sys
path, key, value = sys.argv[1:4]
text = open(path).read()
text, n = re.subn(rf"(?m)^{key} = .*$", lambda m: f"{key} = {json.dumps(value)}", text, count=1)
if not n:
    sys.exit(f"{path}: no '{key} =' line")
open(path, "w").write(text)
EOF
}

echo "installing into $PREFIX"
mkdir -p "$PREFIX/artifacts" "$PREFIX/data"
rm -rf "$PREFIX/runtime" "$PREFIX/firmware_configs"
cp -r "$HERE/runtime" "$HERE/firmware_configs" "$PREFIX/"
cp "$HERE/requirements.txt" "$HERE/README.md" "$HERE/MANIFEST.json" "$PREFIX/"
if [ -f "$PREFIX/device.toml" ]; then cp "$PREFIX/device.toml" "$PREFIX/device.toml.bak"; fi
cp "$HERE/device.toml" "$PREFIX/device.toml"
# Artifacts pushed by the server accumulate in $PREFIX/artifacts; re-installing keeps them.
if [ -d "$HERE/artifacts" ]; then cp -r "$HERE/artifacts/." "$PREFIX/artifacts/"; fi
if [ -f "$HERE/data/shard.npz" ]; then cp "$HERE/data/shard.npz" "$PREFIX/data/shard.npz"; fi
[ -f "$PREFIX/data/shard.npz" ] || echo "warning: no $PREFIX/data/shard.npz yet; the agent needs one (x, y arrays)" >&2
if [ "$ID_FROM_HOSTNAME" = 1 ]; then
  set_key id "$(hostname -s | tr -c 'A-Za-z0-9._\n-' '-' | cut -c1-64)"
fi
if [ -n "$BROKER" ]; then set_key url "$BROKER"; fi

[ -x "$PREFIX/venv/bin/python" ] || "$PYTHON" -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/python" -m pip install --quiet -r "$PREFIX/requirements.txt"
if [ -n "$ORT_SOURCE" ]; then
  # -c keeps the requirements' pins (numpy<2) while pip resolves the wheel's own dependencies.
  "$PREFIX/venv/bin/python" -m pip install --quiet -c "$PREFIX/requirements.txt" "$ORT_SOURCE"
fi
(cd "$PREFIX" && ORCHARD_FIRMWARE_CONFIGS="$PREFIX/firmware_configs" "$PREFIX/venv/bin/python" -c '
from runtime.ort import training_api; training_api()
from runtime.board import load_board; from runtime.device_config import load_device_config
c = load_device_config("device.toml"); b = load_board(c.board)
print(f"runtime ok: device {c.device_id} on {b.name}, broker {c.broker_url}, root {c.root}")') \
  || die "the installed runtime does not start; see the Python error above"
# The service user cannot write __pycache__ under the root-owned prefix: compile once here.
"$PREFIX/venv/bin/python" -m compileall -q "$PREFIX/runtime" >/dev/null

if [ "$SERVICE" = 0 ]; then
  echo "installed; start by hand: cd $PREFIX && venv/bin/python -m runtime --config device.toml"
  exit 0
fi
if [ "$RUN_USER" != root ]; then
  id "$RUN_USER" >/dev/null 2>&1 \
    || useradd --system --home-dir "$PREFIX" --no-create-home --shell /usr/sbin/nologin "$RUN_USER"
  # Power sensors: Pi 5's PMIC is read with vcgencmd (group video), INA2xx/INA3221 over i2c.
  for g in video i2c; do if getent group "$g" >/dev/null; then usermod -aG "$g" "$RUN_USER"; fi; done
  chown -R "$RUN_USER" "$PREFIX/artifacts" "$PREFIX/data"
  # device.toml may hold the broker password: readable by the service user, not by everyone.
  chown "root:$(id -gn "$RUN_USER")" "$PREFIX/device.toml" && chmod 640 "$PREFIX/device.toml"
fi
sed -e "s#@PREFIX@#$PREFIX#g" -e "s#^User=.*#User=$RUN_USER#" "$HERE/@UNIT@" > "/etc/systemd/system/@UNIT@"
systemctl daemon-reload
systemctl enable @UNIT@
systemctl restart @UNIT@
echo "started @UNIT@; logs: journalctl -u @UNIT@ -f"
"""

BUILD_ORT_SH = r"""#!/usr/bin/env bash
# Build the onnxruntime-training @ORT_VERSION@ Python wheel from source, for boards without a published
# wheel (Linux aarch64: Raspberry Pi 4/5, Jetson). Run it on the board or in an aarch64
# container on a bigger machine, with the same Python minor version as the board's venv.
# Env: PYTHON (default @PYTHON@), WORK (default ~/ort-build), JOBS (compile jobs),
#      TRAINING_FLAG (default --enable_training_apis; see the wheel check at the end).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-@PYTHON@}"
WORK="${WORK:-$HOME/ort-build}"
TRAINING_FLAG="${TRAINING_FLAG:---enable_training_apis}"
die() { echo "build-ort-wheel.sh: error: $*" >&2; exit 1; }
for tool in git g++ make "$PYTHON"; do
  command -v "$tool" >/dev/null || die "$tool not found: apt-get install build-essential git python3-dev python3-venv"
done

# Some translation units need ~1.5 GB to compile: one job per 2 GB of RAM + swap, at most one per core.
mem_kb=$(awk '/^MemTotal:/ {m=$2} /^SwapTotal:/ {s=$2} END {print m+s}' /proc/meminfo)
JOBS="${JOBS:-$(( mem_kb / 2000000 > 0 ? mem_kb / 2000000 : 1 ))}"
[ "$JOBS" -le "$(nproc)" ] || JOBS="$(nproc)"
if [ "$mem_kb" -lt 6000000 ]; then
  echo "warning: $((mem_kb / 1024)) MB of RAM + swap; the build may be killed. Add swap (Pi OS: CONF_SWAPSIZE=4096" \
       "and CONF_MAXSWAP=4096 in /etc/dphys-swapfile, then dphys-swapfile setup && swapon; elsewhere:" \
       "fallocate -l 4G /swapfile && chmod 600 /swapfile && mkswap /swapfile && swapon /swapfile)" >&2
fi

mkdir -p "$WORK"
[ -x "$WORK/venv/bin/python" ] || "$PYTHON" -m venv "$WORK/venv"
# shellcheck disable=SC1091
. "$WORK/venv/bin/activate"
# ORT 1.19 wants CMake >= 3.26; Debian 12 / Pi OS Bookworm ship 3.25, so take it from PyPI.
pip install --quiet "cmake>=3.26" "numpy>=1.24,<2" packaging wheel setuptools
if [ ! -d "$WORK/onnxruntime" ]; then
  git clone --recursive --depth 1 --branch v@ORT_VERSION@ \
    https://github.com/microsoft/onnxruntime.git "$WORK/onnxruntime"
fi
cd "$WORK/onnxruntime"
ROOT_FLAG=""
if [ "$(id -u)" = 0 ]; then ROOT_FLAG="--allow_running_as_root"; fi  # build.py refuses root otherwise
# shellcheck disable=SC2086
./build.sh --config Release --build_shared_lib --parallel "$JOBS" $TRAINING_FLAG --build_wheel --skip_tests $ROOT_FLAG

WHL=""
for w in build/Linux/Release/dist/onnxruntime_training*.whl; do if [ -f "$w" ]; then WHL="$w"; fi; done
[ -n "$WHL" ] || die "the build left no onnxruntime_training*.whl in build/Linux/Release/dist"
# setup.py lists the onnxruntime.training.api subpackage only for --enable_training builds; check
# that this wheel has it rather than finding out on the board (upstream #16650).
"$PYTHON" - "$WHL" <<'EOF' || die "$WHL lacks onnxruntime/training/api; rebuild with TRAINING_FLAG=--enable_training"
import sys, zipfile
sys.exit("onnxruntime/training/api/module.py" not in zipfile.ZipFile(sys.argv[1]).namelist())
EOF
cp "$WHL" "$HERE/"
echo "built $(basename "$WHL"); now run: sudo bash $HERE/install.sh"
"""

UNIT = """# Orchard device agent: @BOARD@, device @DEVICE@. install.sh installs it (with its --prefix).
[Unit]
Description=Orchard device agent (@BOARD@)
Documentation=file://@PREFIX@/README.md
After=network-online.target
Wants=network-online.target
# Never give up restarting (the default gives up after 5 starts in 10 s): a board that crash-loops
# at boot, e.g. before its network is up, must still rejoin later without a visit.
StartLimitIntervalSec=0

[Service]
Type=simple
User=orchard
WorkingDirectory=@PREFIX@
Environment=ORCHARD_FIRMWARE_CONFIGS=@PREFIX@/firmware_configs
Environment=PYTHONUNBUFFERED=1
ExecStart=@PREFIX@/venv/bin/python -m runtime --config @PREFIX@/device.toml
Restart=always
RestartSec=5
# The agent says "offline" on SIGTERM and stops its trainer child; give it time to.
TimeoutStopSec=20
# No MemoryMax=/CPUQuota=: on a real board the board itself is the limit. The board config's
# memory cap exists for the testbed, which emulates this board on a bigger host.

[Install]
WantedBy=multi-user.target
"""

README = """# Orchard device bundle: @BOARD@ / @DEVICE@

Built @CREATED@ by Orchard @VERSION@ for @BOARD_DESC@.

## What is inside
| path | what |
|---|---|
| `runtime/` | the device runtime (needs numpy, onnxruntime-training, paho-mqtt, psutil) |
| `firmware_configs/@BOARD@.toml` | the board config: cores, RAM, power model, sensor |
| `device.toml` | this device: id, board, shard, artifact cache, profiles, broker (paths relative to it) |
| `data/shard.npz` | @SHARD@ |
| `artifacts/<key>/` | @ARTIFACTS@ |
| `requirements.txt` | pip packages, except onnxruntime-training (install.sh handles it) |
| `install.sh`, `build-ort-wheel.sh` | installer; source build of the onnxruntime-training @ORT_VERSION@ wheel |
| `@UNIT@` | systemd unit (install.sh installs it) |
| `MANIFEST.json` | SHA-256 of every file; install.sh refuses a damaged bundle |

## Install
Needs Python >= 3.11 with venv (Pi OS Bookworm: `sudo apt-get install python3-venv`).

    tar xzf @NAME@.tar.gz && sudo bash @NAME@/install.sh

Options: `--prefix DIR` (default @PREFIX@), `--python PY`, `--wheel FILE`, `--broker URL`,
`--user NAME` (default `orchard`, created), `--no-service`. It installs into a venv under the
prefix and starts `@UNIT@`. onnxruntime-training @ORT_VERSION@: x86_64 gets
`onnxruntime-training-cpu` from PyPI; aarch64 (Pi, Jetson) has no published wheel, so build
it once with `bash build-ort-wheel.sh` (hours on a Pi 4; ~6 GB RAM + swap) or in an aarch64
container, put the wheel next to `install.sh` (or pass `--wheel`) and run install.sh again.
One wheel serves every board with the same Python; from the host, `orchard flash --wheel`.
Re-running install.sh keeps the venv and pushed artifacts, and restores this bundle's
`device.toml` (the previous one is kept as `device.toml.bak`).

## Start, stop, logs
    sudo systemctl status @UNIT@
    sudo systemctl restart @UNIT@        # or stop / start
    sudo systemctl disable --now @UNIT@  # stop, and do not start at boot
    journalctl -u @UNIT@ -f

## Broker
`[broker] url` in `device.toml` (`mqtt://HOST:1883`, or `mqtts://user:pass@HOST:8883` with
`ca_file`); `root` (now `@ROOT@`) must be the server's campaign root. Change it with
`sudo bash install.sh --broker mqtt://HOST:1883`, or edit `@PREFIX@/device.toml` and restart.

## Verify by hand
    sudo systemctl stop @UNIT@ && cd @PREFIX@
    sudo -u orchard ORCHARD_FIRMWARE_CONFIGS=$PWD/firmware_configs \\
        venv/bin/python -m runtime --config device.toml --broker mqtt://HOST:1883 --log-level DEBUG

The device says hello once the server's retained state is online; watch it with
`mosquitto_sub -h HOST -t '@ROOT@/dev/+/status' -v`.

## Uninstall
    sudo systemctl disable --now @UNIT@ && sudo rm /etc/systemd/system/@UNIT@
    sudo rm -rf @PREFIX@ && sudo userdel orchard
"""


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


def _build_artifacts(model: str, dataset: str, data_root: str | None, profiles: Sequence[str], optimizer: str,
                     cache_dir: Path | None, shard: Shard | None) -> dict[str, Path]:
    """Artifact directory per profile, built the way testbed/prepare.py builds a run's."""
    from models.artifacts import ensure_artifacts
    from models.builder import build
    from models.datasets import load_dataset
    from models.structure import full_structure, sub_structure
    from runtime.submodel import index_map_for

    ds = load_dataset(dataset, data_root)  # only for the input shape and class count
    if shard is not None:
        x, y = shard
        if tuple(x.shape[1:]) != ds.input_shape or int(y.max()) >= ds.num_classes or int(y.min()) < 0:
            raise ConfigError(f"shard samples {tuple(x.shape[1:])} / labels {int(y.min())}..{int(y.max())} do not fit"
                              f" {dataset} ({ds.input_shape}, {ds.num_classes} classes)")
    full = full_structure(model, ds.input_shape, ds.num_classes)
    groups = build(full).layout.groups
    return {p: ensure_artifacts(sub_structure(full, index_map_for(parse_profile(p), groups)), optimizer,
                                cache_dir).directory for p in profiles}


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
    return info


def build_bundle(board: str, out_dir: Path, *, device_id: str | None, broker_url: str, root: str,
                 profiles: Sequence[str], model: str | None, dataset: str | None, shard: Path | None,
                 python: str = "python3", force: bool = False, optimizer: str = "sgd",
                 cache_dir: Path | None = None, data_root: str | None = None) -> Path:
    """Build `out_dir/orchard-<board>-<device>/` and its `.tar.gz`; return the tarball's path
    (what `flash` takes). `dataset` (default digits) sets the artifacts' input shape and classes.
    Raises ConfigError naming the bad input; nothing is left half-written."""
    cfg = load_board(board)
    if device_id is not None and not ID_PATTERN.fullmatch(device_id):
        raise ConfigError(f"device id {device_id!r} must be 1-64 of A-Z a-z 0-9 . _ -")
    parse_broker_url(broker_url)
    if not root or any(c in root for c in "+#") or root.startswith("/") or root.endswith("/"):
        raise ConfigError(f"topic root {root!r} must be non-empty, without + or #, and not start or end with /")
    if not python.strip() or any(c.isspace() or c in "'\"$`\\" for c in python):
        raise ConfigError(f"python interpreter {python!r} must be a plain command name or path")
    canonical = list(dict.fromkeys(parse_profile(p).canonical() for p in (profiles or ["dense"])))
    if dataset is not None and model is None:
        raise ConfigError("a dataset only matters with a model (it sets the artifacts' input shape and classes)")
    arrays = _read_shard(Path(shard)) if shard is not None else None
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

    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    stage.chmod(0o755)  # mkdtemp makes it 0700
    try:
        _fill(stage, name, cfg.name, cfg.description, board_src, device_id, broker_url, root, canonical, model,
              dataset, arrays, artifacts, python)
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


def _fill(stage: Path, name: str, board: str, description: str, board_src: Path, device_id: str | None,
          broker_url: str, root: str, profiles: list[str], model: str | None, dataset: str | None,
          arrays: Shard | None, artifacts: dict[str, Path], python: str) -> None:
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
        "broker": {"url": broker_url, "root": root, "keepalive_s": 10},
    })
    header = f"# Device config for {name} (format: runtime/device_config.py). Paths are relative to this file.\n"
    (stage / "device.toml").write_text(header + (stage / "device.toml").read_text())
    (stage / "requirements.txt").write_text(
        f"# onnxruntime-training=={ORT_VERSION} is installed by install.sh (no aarch64 wheel on PyPI)\n"
        + "\n".join(REQUIREMENTS) + "\n")
    common = {"BOARD": board, "DEVICE": device_id or "(hostname)", "ORT_VERSION": ORT_VERSION, "UNIT": UNIT_NAME}
    build_cmds = _BUILD_CMDS.replace("@HERE@", "$HERE")
    (stage / "install.sh").write_text(_render(
        INSTALL_SH, **common, PREFIX=DEFAULT_PREFIX, PYTHON=shlex.quote(python), HASH_CHECK=_HASH_CHECK,
        BUILD_CMDS=build_cmds, ID_FROM_HOSTNAME="0" if device_id else "1"))
    (stage / "build-ort-wheel.sh").write_text(_render(BUILD_ORT_SH, ORT_VERSION=ORT_VERSION, PYTHON=python))
    (stage / UNIT_NAME).write_text(_render(UNIT, **common, PREFIX=DEFAULT_PREFIX))
    shard_note = ("local training data, x float32 (N, C, H, W), y int64 (N,)" if arrays is not None else
                  "not bundled: put the device's data here (x float32 (N, C, H, W), y int64 (N,))")
    art_note = (f"prebuilt {model} artifacts for {', '.join(f'{p} ({k})' for p, k in keys.items())}"
                if keys else "none bundled; the server pushes what the device lacks")
    (stage / "README.md").write_text(_render(
        README, **common, PREFIX=DEFAULT_PREFIX, NAME=name, VERSION=__version__, BOARD_DESC=description,
        CREATED=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), SHARD=shard_note, ARTIFACTS=art_note,
        ROOT=root))
    for script in SCRIPTS:
        (stage / script).chmod(0o755)
    # No broker URL here: it may carry a password, and device.toml already has it.
    (stage / BUNDLE_MANIFEST).write_text(json.dumps({
        "format": 1, "orchard": __version__, "board": board, "device_id": device_id, "root": root,
        "profiles": profiles, "model": model, "dataset": (dataset or "digits") if model else None,
        "artifacts": keys, "onnxruntime_training": ORT_VERSION, "files": _file_list(stage),
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
        raise ConfigError(f"wheel not found: {wheel}")
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            names = tar.getnames()
    except (tarfile.TarError, OSError) as exc:
        raise ConfigError(f"{tar_path} is not a bundle tarball: {exc}") from None
    top = names[0].split("/")[0] if names else ""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", top) or f"{top}/install.sh" not in names:
        raise ConfigError(f"{tar_path} is not a bundle tarball: no {top}/install.sh")
    extra = list(install_args)
    sources = [str(tar_path)]
    if wheel is not None:
        sources.append(str(wheel))
        extra += ["--wheel", f"/tmp/{Path(wheel).name}"]
    remote = (f"cd /tmp && rm -rf {shlex.quote(top)} && tar xzf {shlex.quote(tar_path.name)}"
              f" && sudo bash {shlex.quote(f'/tmp/{top}/install.sh')}" + "".join(f" {shlex.quote(a)}" for a in extra))
    # -t: sudo on the board may need to ask for a password.
    commands = [[*shlex.split(scp), *sources, f"{host}:/tmp/"], [*shlex.split(ssh), "-t", host, remote]]
    if not dry_run:
        for cmd in commands:
            rc = subprocess.run(cmd, check=False).returncode
            if rc != 0:
                raise OrchardError(f"flash: `{shlex.join(cmd)}` exited with status {rc}")
    return commands
