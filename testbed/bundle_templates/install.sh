#!/usr/bin/env bash
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
BOARD_PYTHON=@BOARD_PYTHON@  # the CPython the bundle's wheels are locked for (requirements.lock)
BUNDLE_ARCH=@ARCH@
ORT_WHEEL=@ORT_WHEEL@  # an onnxruntime-training wheel in wheels/ (locked too), or empty
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

echo "[1/6] checking Python, architecture and the bundle"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install Python $BOARD_PYTHON or pass --python"
PYV="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" || PYV="unknown"
[ "$PYV" = "$BOARD_PYTHON" ] || die "$PYTHON is Python $PYV; this bundle's wheels are locked for CPython" \
  "$BOARD_PYTHON (pass --python python$BOARD_PYTHON, or rebuild the bundle with --board-python $PYV)"
ARCH="$(uname -m)"
[ "$ARCH" = "$BUNDLE_ARCH" ] || die "this machine is $ARCH; the bundle's wheels are for $BUNDLE_ARCH (rebuild with --arch $ARCH)"
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
echo "[2/6] finding onnxruntime-training $ORT_VERSION"
if [ -z "$WHEEL" ]; then
  for w in "$HERE"/onnxruntime_training*.whl; do if [ -f "$w" ]; then WHEEL="$w"; fi; done
fi
ORT_SOURCE=""
if [ -n "$WHEEL" ]; then
  [ -f "$WHEEL" ] || die "wheel $WHEEL not found"
  "$PYTHON" -c 'import sys, zipfile
sys.exit("onnxruntime/training/api/module.py" not in zipfile.ZipFile(sys.argv[1]).namelist())' "$WHEEL" \
    || die "$WHEEL has no onnxruntime/training/api: build it with --enable_training_apis"
  ORT_SOURCE="$WHEEL"
elif [ -n "$ORT_WHEEL" ]; then
  echo "onnxruntime-training from the bundle: $ORT_WHEEL (locked)"
elif [ -x "$PREFIX/venv/bin/python" ] && ort_ok "$PREFIX/venv/bin/python"; then
  echo "onnxruntime-training $ORT_VERSION already installed in $PREFIX/venv"
else
  cat >&2 <<EOF
There is no onnxruntime-training $ORT_VERSION wheel for $ARCH. Build one from source, once per
Python version (it serves every board of that kind), on the board or in an $ARCH container:
@BUILD_CMDS@
(or run: bash $HERE/build-ort-wheel.sh, which also installs cmake >= 3.26 and checks the wheel;
on a bigger x86_64 machine: bash build-ort-wheel.sh --container [--jetson], in an arm64 image under QEMU).
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

echo "[3/6] installing into $PREFIX"
mkdir -p "$PREFIX/artifacts" "$PREFIX/data" "$PREFIX/state"
rm -rf "$PREFIX/runtime" "$PREFIX/firmware_configs"
cp -r "$HERE/runtime" "$HERE/firmware_configs" "$PREFIX/"
cp "$HERE/requirements.lock" "$HERE/README.md" "$HERE/MANIFEST.json" "$PREFIX/"
if [ -f "$PREFIX/device.toml" ]; then cp "$PREFIX/device.toml" "$PREFIX/device.toml.bak"; fi
cp "$HERE/device.toml" "$PREFIX/device.toml"
# The device's login and HMAC key: 0600 from the start, never readable by others.
if [ -f "$HERE/credentials.toml" ]; then install -m 600 "$HERE/credentials.toml" "$PREFIX/credentials.toml"; fi
# Artifacts pushed by the server accumulate in $PREFIX/artifacts; re-installing keeps them.
if [ -d "$HERE/artifacts" ]; then cp -r "$HERE/artifacts/." "$PREFIX/artifacts/"; fi
if [ -f "$HERE/data/shard.npz" ]; then cp "$HERE/data/shard.npz" "$PREFIX/data/shard.npz"; fi
[ -f "$PREFIX/data/shard.npz" ] || echo "warning: no $PREFIX/data/shard.npz yet; the agent needs one (x, y arrays)" >&2
if [ "$ID_FROM_HOSTNAME" = 1 ]; then
  set_key id "$(hostname -s | tr -c 'A-Za-z0-9._\n-' '-' | cut -c1-64)"
fi
if [ -n "$BROKER" ]; then set_key url "$BROKER"; fi

echo "[4/6] installing the locked wheels (offline, hashes checked)"
[ -x "$PREFIX/venv/bin/python" ] || "$PYTHON" -m venv "$PREFIX/venv"
# Every package pinned with its hash and taken from the bundle only; --no-deps keeps ORT's
# metadata (onnx, sympy, h5py, ...) from being resolved: the training API imports none of it.
"$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$HERE/wheels" \
  --no-deps --require-hashes --only-binary :all: -r "$PREFIX/requirements.lock"
if [ -n "$ORT_SOURCE" ]; then
  "$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps "$ORT_SOURCE"
fi
echo "[5/6] checking the installed runtime"
(cd "$PREFIX" && ORCHARD_FIRMWARE_CONFIGS="$PREFIX/firmware_configs" "$PREFIX/venv/bin/python" -c '
from runtime.ort import training_api; training_api()
from runtime.board import load_board; from runtime.device_config import load_device_config
c = load_device_config("device.toml"); b = load_board(c.board)
print(f"runtime ok: device {c.device_id} on {b.name}, broker {c.broker_url}, root {c.root}")') \
  || die "the installed runtime does not start; see the Python error above"
# The service user cannot write __pycache__ under the root-owned prefix: compile once here.
"$PREFIX/venv/bin/python" -m compileall -q "$PREFIX/runtime" >/dev/null

echo "[6/6] service"
if [ "$SERVICE" = 0 ]; then
  echo "installed; start by hand: cd $PREFIX && venv/bin/python -m runtime --config device.toml"
  exit 0
fi
if [ "$RUN_USER" != root ]; then
  id "$RUN_USER" >/dev/null 2>&1 \
    || useradd --system --home-dir "$PREFIX" --no-create-home --shell /usr/sbin/nologin "$RUN_USER"
  # Power sensors: Pi 5's PMIC is read with vcgencmd (group video), INA2xx/INA3221 over i2c.
  for g in video i2c; do if getent group "$g" >/dev/null; then usermod -aG "$g" "$RUN_USER"; fi; done
  chown -R "$RUN_USER" "$PREFIX/artifacts" "$PREFIX/data" "$PREFIX/state"
  # device.toml may hold the broker password: readable by the service user, not by everyone.
  chown "root:$(id -gn "$RUN_USER")" "$PREFIX/device.toml" && chmod 640 "$PREFIX/device.toml"
  if [ -f "$PREFIX/credentials.toml" ]; then chown "$RUN_USER" "$PREFIX/credentials.toml"; fi
fi
sed -e "s#@PREFIX@#$PREFIX#g" -e "s#^User=.*#User=$RUN_USER#" "$HERE/@UNIT@" > "/etc/systemd/system/@UNIT@"
systemctl daemon-reload
systemctl enable @UNIT@
systemctl restart @UNIT@
echo "started @UNIT@; logs: journalctl -u @UNIT@ -f"
