#!/usr/bin/env bash
# Build the onnxruntime-training @ORT_VERSION@ Python wheel from source, for boards without a published
# wheel (Linux aarch64: Raspberry Pi 4/5, Jetson).
#
#   bash build-ort-wheel.sh                      native: on the board, or inside an aarch64 container
#   bash build-ort-wheel.sh --container [--python 3.10] [--jetson] [--engine docker|podman]
#                                                on a bigger x86_64 machine: an arm64 Debian (or, with
#                                                --jetson, NVIDIA L4T JetPack) container under QEMU
#
# --python X.Y   the board's CPython (default @BOARD_PYTHON@, this bundle's); the wheel only loads there
# --jetson       CUDA build (--use_cuda + --enable_training_apis) in L4T JetPack r35 (3.8) / r36 (3.10);
#                the trainer then uses CUDAExecutionProvider, and falls back to CPU if the device lacks it
# --engine E     docker (buildx/binfmt) or podman; default: whichever is installed
# Env: PYTHON (native mode, default @PYTHON@), WORK (default ~/ort-build), JOBS (compile jobs),
#      TRAINING_FLAG (default --enable_training_apis; see the wheel check at the end),
#      CUDA_ARCHS (--jetson; default 72;87: Xavier and Orin).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-@PYTHON@}"
WORK="${WORK:-$HOME/ort-build}"
TRAINING_FLAG="${TRAINING_FLAG:---enable_training_apis}"
CONTAINER=0
JETSON=0
ENGINE=""
PYV=@BOARD_PYTHON@
die() { echo "build-ort-wheel.sh: error: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --container) CONTAINER=1; shift ;;
    --jetson) JETSON=1; shift ;;
    --python) PYV="${2:?--python needs a version like 3.10}"; shift 2 ;;
    --engine) ENGINE="${2:?--engine needs docker or podman}"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
case "$PYV" in 3.8|3.9|3.10|3.11|3.12) ;; *) die "--python $PYV: the runtime runs on CPython 3.8-3.12" ;; esac

if [ "$CONTAINER" = 1 ]; then
  # Which image: the board's OS family, so the wheel's glibc and CPython match the board's.
  if [ "$JETSON" = 1 ]; then
    case "$PYV" in
      3.8) IMAGE="nvcr.io/nvidia/l4t-jetpack:r35.4.1" ;;   # JetPack 5.1, Ubuntu 20.04, CUDA 11.4
      3.10) IMAGE="nvcr.io/nvidia/l4t-jetpack:r36.3.0" ;;  # JetPack 6, Ubuntu 22.04, CUDA 12.2
      *) die "--jetson --python $PYV: JetPack 5 ships 3.8, JetPack 6 ships 3.10" ;;
    esac
  elif [ "$PYV" = 3.11 ] || [ "$PYV" = 3.12 ]; then
    IMAGE="docker.io/library/python:$PYV-bookworm"        # Pi OS Bookworm: glibc 2.36
  else
    IMAGE="docker.io/library/python:$PYV-bullseye"        # glibc 2.31: loads on JetPack 5/6 too
  fi
  if [ -z "$ENGINE" ]; then
    for e in docker podman; do if command -v "$e" >/dev/null; then ENGINE="$e"; break; fi; done
  fi
  [ -n "$ENGINE" ] || die "neither docker nor podman found; install one (and qemu-user-static)"
  if [ "$(uname -m)" != aarch64 ] && [ ! -e "${BINFMT_QEMU:-/proc/sys/fs/binfmt_misc/qemu-aarch64}" ]; then
    die "no QEMU for aarch64 registered: sudo apt-get install qemu-user-static binfmt-support" \
        "(or: $ENGINE run --privileged --rm docker.io/tonistiigi/binfmt --install arm64)"
  fi
  mkdir -p "$WORK"
  echo "building in $IMAGE (linux/arm64, $ENGINE); under QEMU this takes many hours (see README.md)"
  RUN_ENV=(-e "JOBS=${JOBS:-}" -e "TRAINING_FLAG=$TRAINING_FLAG" -e "WORK=/work" -e "PYTHON=python$PYV"
           -e "ORCHARD_JETSON=$JETSON" -e "CUDA_ARCHS=${CUDA_ARCHS:-72;87}")
  # The native path below runs inside; the bundle folder is mounted, so the wheel lands next to
  # install.sh, and the source tree and build stay in $WORK for a rerun.
  "$ENGINE" run --rm --platform linux/arm64 "${RUN_ENV[@]}" -v "$HERE:/bundle" -v "$WORK:/work" "$IMAGE" \
    bash -c 'apt-get update -qq && apt-get install -y -qq build-essential git python3-dev python3-venv >/dev/null \
             && bash /bundle/build-ort-wheel.sh --python '"$PYV"
  exit $?
fi

for tool in git g++ make "$PYTHON"; do
  command -v "$tool" >/dev/null || die "$tool not found: apt-get install build-essential git python3-dev python3-venv"
done
"$PYTHON" -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(v != sys.argv[1] and "%s is Python %s, not %s" % (sys.executable, v, sys.argv[1]))' "$PYV" \
  || die "build with the board's CPython $PYV (PYTHON=python$PYV), or pass --python"

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
CUDA_FLAGS=""
if [ "${ORCHARD_JETSON:-0}" = 1 ]; then
  # JetPack's CUDA and cuDNN; the CUDA EP is what the trainer asks for on a Jetson board config.
  CUDA_FLAGS="--use_cuda --cuda_home /usr/local/cuda --cudnn_home /usr/lib/aarch64-linux-gnu"
  CUDA_FLAGS="$CUDA_FLAGS --cmake_extra_defines CMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-72;87}"
fi
# shellcheck disable=SC2086
./build.sh --config Release --build_shared_lib --parallel "$JOBS" $TRAINING_FLAG $CUDA_FLAGS --build_wheel \
  --skip_tests $ROOT_FLAG

WHL=""
for w in build/Linux/Release/dist/onnxruntime_training*.whl; do if [ -f "$w" ]; then WHL="$w"; fi; done
[ -n "$WHL" ] || die "the build left no onnxruntime_training*.whl in build/Linux/Release/dist"
# setup.py lists the onnxruntime.training.api subpackage only for --enable_training builds; check
# that this wheel has it rather than finding out on the board (upstream #16650).
"$PYTHON" - "$WHL" <<'CHECK' || die "$WHL lacks onnxruntime/training/api; rebuild with TRAINING_FLAG=--enable_training"
import sys, zipfile
sys.exit("onnxruntime/training/api/module.py" not in zipfile.ZipFile(sys.argv[1]).namelist())
CHECK
cp "$WHL" "$HERE/"
echo "built $(basename "$WHL"); now run: sudo bash $HERE/install.sh"
echo "(or, on the host: orchard bundle ... --ort-wheel $(basename "$WHL"), which checks its tags and training API)"
