"""Wheels built by hand for the --ort-wheel checks: a zip in the real wheel layout (dist-info
WHEEL with its Tag lines, the package files), with whatever a test leaves out."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

TRAINING_API = ("onnxruntime/training/api/__init__.py", "onnxruntime/training/api/module.py",
                "onnxruntime/training/api/checkpoint_state.py", "onnxruntime/training/api/optimizer.py")
CORE = ("onnxruntime/__init__.py", "onnxruntime/capi/onnxruntime_pybind11_state.so")


def fake_ort_wheel(path: Path, *, files: tuple[str, ...] = CORE + TRAINING_API, tags: list[str] | None = None) -> Path:
    m = re.fullmatch(r"([^-]+)-([^-]+)-([^-]+)-([^-]+)-([^-]+)\.whl", path.name)
    assert m, path.name
    name, version, py, abi, plat = m.groups()
    tag_lines = "".join(f"Tag: {t}\n" for t in (tags or [f"{py}-{abi}-{plat}"]))
    with zipfile.ZipFile(path, "w") as z:
        for f in files:
            z.writestr(f, "")
        z.writestr(f"{name}-{version}.dist-info/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: false\n{tag_lines}")
        z.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n")
    return path
