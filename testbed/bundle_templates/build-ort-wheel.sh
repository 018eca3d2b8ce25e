#!/usr/bin/env bash
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
