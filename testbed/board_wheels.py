"""What a bundle installs on a board, pinned and hashed for the board's Python and architecture.

`board_lock` downloads the board's wheels (numpy, paho-mqtt, psutil, and tomli below 3.11) for
`cp<XY>` on `<arch>` with pip's cross-platform download, once per (Python, arch), and writes
`requirements.lock`: one `name==version --hash=sha256:...` line per wheel. The bundle ships the
wheels and the lock, so `install.sh` installs offline with `--require-hashes --no-index`, and
nothing the lock does not name can arrive (the unpinned requirements.txt once brought onnx 1.23.2).

onnxruntime-training goes in separately with `--no-deps`: its metadata requires onnx, sympy,
h5py, cerberus, protobuf, ... none of which the training API imports. On x86_64 the PyPI
`onnxruntime-training-cpu` wheel is fetched and locked the same way; there is none for aarch64,
so `check_ort_wheel` vets a self-built one (`orchard bundle --ort-wheel`) before anything is
copied: its tags against the board's Python and architecture, and its contents for the
training API.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ConfigError

ORT_VERSION = "1.19.2"  # the last onnxruntime-training release (platform.md §5)
BOARD_REQUIREMENTS = ("numpy>=1.24,<2", "paho-mqtt>=2,<3", "psutil>=5.9")
TOMLI = "tomli>=1.1"  # Python < 3.11 (runtime/tomlconf.py)
ORT_PYPI = f"onnxruntime-training-cpu=={ORT_VERSION}"
# What the runtime loads from the wheel (runtime/ort.py); setup.py packages training/api only for
# training builds (--enable_training_apis or --enable_training; upstream #16650).
TRAINING_API_FILES = ("onnxruntime/training/api/module.py", "onnxruntime/training/api/checkpoint_state.py",
                      "onnxruntime/training/api/optimizer.py")
CUDA_PROVIDER_LIB = "libonnxruntime_providers_cuda.so"
_WHEEL_NAME = re.compile(r"(?P<name>[A-Za-z0-9_.]+)-(?P<version>[A-Za-z0-9_.+!]+)(-\d[^-]*)?"
                         r"-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl")


@dataclass(frozen=True)
class OrtWheel:
    path: Path
    version: str
    cuda: bool  # carries the CUDA execution provider (a Jetson build with --use_cuda)

    @property
    def lock_line(self) -> str:
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        name = _WHEEL_NAME.fullmatch(self.path.name)
        assert name is not None  # checked by check_ort_wheel
        return f"{name['name'].replace('_', '-').lower()}=={self.version} --hash=sha256:{digest}"


def _platforms(arch: str) -> list[str]:
    # manylinux_2_28 needs glibc 2.28: JetPack 5 (Ubuntu 20.04) has 2.31, Pi OS Bookworm 2.36.
    return [f"manylinux_2_28_{arch}", f"manylinux_2_17_{arch}", f"manylinux2014_{arch}", f"linux_{arch}", "any"]


def _download(specs: list[str], python: str, arch: str, dest: Path) -> None:
    tag = "cp" + python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary", ":all:",
           "--no-deps", "--python-version", python, "--implementation", "cp", "--abi", tag, "--abi", "abi3",
           "--abi", "none", *[a for p in _platforms(arch) for a in ("--platform", p)], "-d", str(dest), *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or proc.stderr.splitlines()[-1:]
        raise ConfigError(f"no wheels of {' '.join(specs)} for CPython {python} on {arch}: "
                          f"{(last or ['pip download failed'])[0]}")


def board_lock(python: str, arch: str, cache_root: Path, *, with_ort: bool) -> tuple[str, list[Path]]:
    """(lock text, wheel files) for CPython `python` on `arch`; cached under `cache_root`.
    `with_ort` adds PyPI's onnxruntime-training-cpu wheel (x86_64 boards) as the lock's last line."""
    key = f"cp{python.replace('.', '')}-{arch}{'-ort' if with_ort else ''}"
    folder = cache_root / "board-wheels" / key
    index = folder / "lock.json"
    specs = [*BOARD_REQUIREMENTS, *([TOMLI] if tuple(map(int, python.split("."))) < (3, 11) else [])]
    if not _cached(index, specs, with_ort):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.whl"):
            stale.unlink()
        _download(specs, python, arch, folder)
        if with_ort:
            _download([ORT_PYPI], python, arch, folder)
        index.write_text(json.dumps({"specs": specs, "with_ort": with_ort}))
    wheels = sorted(folder.glob("*.whl"), key=lambda p: (p.name.lower().startswith("onnxruntime"), p.name.lower()))
    lines = [f"# Board packages for CPython {python} on {arch}, pinned with their hashes (orchard bundle).",
             "# install.sh: pip install --no-index --find-links wheels --require-hashes -r requirements.lock",
             "# (onnxruntime-training, when listed, with --no-deps: see README.md)"]
    for wheel in wheels:
        m = _WHEEL_NAME.fullmatch(wheel.name)
        if m is None:
            raise ConfigError(f"{wheel}: not a wheel file name")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        lines.append(f"{m['name'].replace('_', '-').lower()}=={m['version']} --hash=sha256:{digest}")
    return "\n".join(lines) + "\n", wheels


def _cached(index: Path, specs: list[str], with_ort: bool) -> bool:
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):
        return False
    return bool(data == {"specs": specs, "with_ort": with_ort} and any(index.parent.glob("numpy-*.whl")))


def check_ort_wheel(path: Path, python: str, arch: str, flag: str = "--ort-wheel") -> OrtWheel:
    """Vet a built onnxruntime-training wheel for a board (CPython `python` on `arch`) by its name,
    its WHEEL tags and its contents; raise ConfigError naming the check that failed."""
    where = f"{flag} {path.name}"
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    m = _WHEEL_NAME.fullmatch(path.name)
    if m is None:
        raise ConfigError(f"{where}: not a wheel file name (name-version-pytag-abitag-platform.whl)")
    if not re.fullmatch(r"onnxruntime_training(_[a-z0-9]+)?", m["name"].lower()):
        raise ConfigError(f"{where}: package {m['name']!r} is not onnxruntime-training (an inference-only "
                          f"onnxruntime wheel has no training API)")
    cp = "cp" + python.replace(".", "")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            wheel_meta = [n for n in names if n.endswith(".dist-info/WHEEL")]
            tags = [ln.split(":", 1)[1].strip() for ln in z.read(wheel_meta[0]).decode().splitlines()
                    if ln.startswith("Tag:")] if wheel_meta else []
    except (zipfile.BadZipFile, OSError, KeyError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not a readable wheel (zip): {exc}") from None
    tags = tags or [f"{m['py']}-{m['abi']}-{m['plat']}"]
    fits = [t for t in tags if _tag_fits(t, cp, arch)]
    if not fits:
        raise ConfigError(f"{where}: wrong tags {', '.join(sorted(tags))} for this board (CPython {python}, "
                          f"{arch}): build it with that Python on that architecture")
    missing = [f for f in TRAINING_API_FILES if f not in names]
    if missing:
        raise ConfigError(f"{where}: no training API ({missing[0]} missing): the wheel was built without "
                          "--enable_training_apis")
    if not any(n.startswith("onnxruntime/capi/onnxruntime_pybind11_state") for n in names):
        raise ConfigError(f"{where}: no onnxruntime/capi/onnxruntime_pybind11_state module: not a built wheel")
    if not m["version"].startswith(ORT_VERSION):
        raise ConfigError(f"{where}: version {m['version']}, the artifacts are made for {ORT_VERSION}")
    return OrtWheel(path=path, version=m["version"], cuda=any(n.endswith(CUDA_PROVIDER_LIB) for n in names))


def _tag_fits(tag: str, cp: str, arch: str) -> bool:
    parts = tag.split("-")
    if len(parts) != 3:
        return False
    py, abi, plat = parts
    return (cp in py.split(".") and abi in (cp, "abi3", "none")
            and any(p == f"linux_{arch}" or (p.startswith("manylinux") and p.endswith(f"_{arch}"))
                    for p in plat.split(".")))
