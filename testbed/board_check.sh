#!/usr/bin/env bash
# make board-check: the bundle's installer and the runtime in an arm64 Debian bookworm userland
# (Pi OS Bookworm's base: CPython 3.11, glibc 2.36), run under qemu-user on this x86_64 host.
#
# Steps, each timed: tools (qemu-user-static, debootstrap), binfmt (register qemu-aarch64),
# rootfs (debootstrap arm64 bookworm, cached in .cache/board-check/), bundle (orchard bundle for
# rpi4b-4gb: its lock and wheels for cp311 aarch64), install (the bundle's install.sh in the
# chroot: it must pass every step up to onnxruntime-training and stop there with its message,
# as no aarch64 wheel is given), lock (the locked wheels installed in the chroot exactly as
# install.sh does it: offline, hashes required), import (every runtime/ module but runtime.ort
# imported under the arm64 CPython, and `python -m runtime --help`). Not part of `make test`.
# Needs root (debootstrap, chroot, binfmt_misc). Exit 0 when every step did what it should.
set -uo pipefail

ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT_DIR/.venv/bin/python}"
WORK="$ROOT_DIR/.cache/board-check"
CHROOT="$WORK/bookworm-arm64"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
REPORT="$WORK/report.txt"
mkdir -p "$WORK"
: > "$REPORT"
FAILED=""

say() { echo "board-check: $*" | tee -a "$REPORT"; }
step() {  # step NAME COMMAND...: run, time, record; a failed step stops the check
  local name="$1"; shift
  local t0 t1 rc
  t0=$(date +%s.%N)
  "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  printf 'board-check: %-8s %7.1f s  %s\n' "$name" "$(awk "BEGIN {print $t1 - $t0}")" \
    "$([ $rc = 0 ] && echo ok || echo "FAILED (rc $rc): $(tail -n 3 "$WORK/$name.log" | tr '\n' ' ')")" | tee -a "$REPORT"
  if [ $rc != 0 ]; then FAILED="$name"; finish; fi
}
finish() {
  if [ -n "$FAILED" ]; then say "stopped at step '$FAILED' (logs: $WORK/$FAILED.log)"; exit 1; fi
  say "every step did what it should (report: $REPORT)"
  exit 0
}

[ "$(id -u)" = 0 ] || { say "needs root (debootstrap, chroot, binfmt_misc): sudo make board-check"; exit 2; }
[ "$(uname -m)" = x86_64 ] || say "note: host is $(uname -m), not x86_64"

tools() {
  local missing=""
  command -v qemu-aarch64-static >/dev/null || missing="$missing qemu-user-static"
  command -v debootstrap >/dev/null || missing="$missing debootstrap"
  if [ -n "$missing" ]; then apt-get update -qq && apt-get install -y -qq $missing; fi
  command -v qemu-aarch64-static && command -v debootstrap
}
binfmt() {
  # F (fix binary): the kernel opens the interpreter now, so it need not exist inside the chroot.
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    local line
    line=$(grep -v '^#' /usr/lib/binfmt.d/qemu-aarch64.conf | head -n 1)
    [ -n "$line" ] || { echo "no /usr/lib/binfmt.d/qemu-aarch64.conf"; return 1; }
    echo "$line" > /proc/sys/fs/binfmt_misc/register
  fi
  cat /proc/sys/fs/binfmt_misc/qemu-aarch64
}
rootfs() {
  if [ -x "$CHROOT/usr/bin/python3" ] && [ -f "$CHROOT/.orchard-complete" ]; then
    echo "cached: $CHROOT"; return 0
  fi
  rm -rf "$CHROOT"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$CHROOT" "$MIRROR" && touch "$CHROOT/.orchard-complete"
}
bundle() {
  rm -rf "$WORK/dist"
  "$PY" -m testbed.cli bundle --board rpi4b-4gb --broker mqtt://10.0.0.2:1883 --device-id check --out "$WORK/dist"
}
in_chroot() {
  mountpoint -q "$CHROOT/proc" || mount -t proc proc "$CHROOT/proc"
  chroot "$CHROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"
}
trap 'mountpoint -q "$CHROOT/proc" && umount "$CHROOT/proc"' EXIT
install() {
  rm -rf "$CHROOT/tmp/orchard-rpi4b-4gb-check" "$CHROOT/opt/orchard"
  tar xzf "$WORK/dist/orchard-rpi4b-4gb-check.tar.gz" -C "$CHROOT/tmp"
  in_chroot uname -m
  in_chroot python3 -V
  local out rc
  out=$(in_chroot bash /tmp/orchard-rpi4b-4gb-check/install.sh --no-service 2>&1); rc=$?
  echo "$out"
  # Expected: steps 1 (Python 3.11, aarch64, manifest hashes) pass, step 2 stops with the build
  # instructions, and nothing was installed.
  [ $rc != 0 ] || { echo "install.sh succeeded without a wheel?"; return 1; }
  echo "$out" | grep -q '^\[1/6\]' && echo "$out" | grep -q '^\[2/6\]' || return 1
  echo "$out" | tail -n 1 | grep -q 'install.sh: error: no onnxruntime-training wheel for aarch64' || return 1
  [ ! -e "$CHROOT/opt/orchard" ] || { echo "install.sh changed the board before stopping"; return 1; }
}
lock() {
  local b=/tmp/orchard-rpi4b-4gb-check
  rm -rf "$CHROOT/opt/check-venv"
  in_chroot python3 -m venv /opt/check-venv
  # The same command install.sh's step 4 runs.
  in_chroot /opt/check-venv/bin/python -m pip install --quiet --disable-pip-version-check --no-index \
    --find-links "$b/wheels" --no-deps --require-hashes --only-binary :all: -r "$b/requirements.lock"
  in_chroot /opt/check-venv/bin/python -m pip list --format=freeze
}
import_check() {
  local b=/tmp/orchard-rpi4b-4gb-check
  in_chroot /bin/sh -c "cd $b && ORCHARD_FIRMWARE_CONFIGS=$b/firmware_configs /opt/check-venv/bin/python -c '
import importlib, pkgutil, platform, sys
import runtime
names = [m.name for m in pkgutil.walk_packages(runtime.__path__, \"runtime.\") if m.name != \"runtime.ort\"]
for n in names:
    importlib.import_module(n)
from runtime.methods import METHOD_NAMES, half, spec
for n in METHOD_NAMES:
    half(n, \"device\"), spec(n).params()
from runtime.device_config import load_device_config
from runtime.board import load_board
c = load_device_config(\"device.toml\"); b = load_board(c.board)
import numpy
print(f\"{platform.machine()} CPython {platform.python_version()}: {len(names)} runtime modules imported,\",
      f\"numpy {numpy.__version__}; device {c.device_id} on {b.name}\")
' && /opt/check-venv/bin/python -m runtime --help | head -n 1"
}

step tools tools
step binfmt binfmt
step rootfs rootfs
step bundle bundle
step install install
step lock lock
step import import_check
say "$(tail -n 2 "$WORK/import.log" | head -n 1)"
finish
