"""The manifest of a training-artifact directory, and its integrity check.

Artifacts are generated on the host (`models.artifacts`) and read here, on the board. The
manifest records the parameter layout (in ONNX Runtime's buffer order), FLOPs, versions and a
SHA-256 of every file plus of the manifest itself, so a torn copy or a corrupted cache entry is
refused with the file it concerns instead of training on garbage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import ArtifactError, LayoutError
from runtime.layout import ParamLayout

MANIFEST = "manifest.json"
FORMAT = 1
ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


@dataclass(frozen=True)
class Manifest:
    key: str
    model: str
    input_shape: tuple[int, ...]
    num_outputs: int
    layout: ParamLayout
    flops_per_sample: int
    optimizer: str
    files: Mapping[str, str]  # file name -> sha256 hex
    raw: Mapping[str, Any]  # the whole JSON, for fields only the host side reads


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_digest(data: Mapping[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(directory: Path | str, verify: bool = True) -> Manifest:
    """Load and (by default) verify an artifact directory; raise ArtifactError naming the problem."""
    d = Path(directory)
    path = d / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"artifact directory {d}: {MANIFEST} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"artifact directory {d}: {MANIFEST} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"artifact directory {d}: {MANIFEST} is not a JSON object")
    if data.get("manifest_sha256") != manifest_digest(data):
        raise ArtifactError(f"artifact directory {d}: {MANIFEST} does not match its own hash (edited or torn)")
    if data.get("format") != FORMAT:
        raise ArtifactError(f"artifact directory {d}: manifest format {data.get('format')!r}, expected {FORMAT}")
    try:
        structure = data["structure"]
        manifest = Manifest(
            key=str(data["key"]),
            model=str(structure["model"]),
            input_shape=tuple(int(v) for v in structure["input_shape"]),
            num_outputs=int(structure["channels"]["classes"]),
            layout=ParamLayout.from_dict(data["layout"]),
            flops_per_sample=int(data["flops_per_sample"]),
            optimizer=str(data["optimizer"]),
            files={str(k): str(v) for k, v in data["files"].items()},
            raw=data,
        )
    except (KeyError, TypeError, ValueError, LayoutError) as exc:
        raise ArtifactError(f"artifact directory {d}: manifest field missing or malformed: {exc}") from None
    if verify:
        for name in ARTIFACT_FILES:
            expected = manifest.files.get(name)
            f = d / name
            if expected is None:
                raise ArtifactError(f"artifact directory {d}: manifest lists no hash for {name}")
            if not f.is_file():
                raise ArtifactError(f"artifact directory {d}: {name} is missing")
            if file_sha256(f) != expected:
                raise ArtifactError(f"artifact directory {d}: {name} is corrupted (sha256 mismatch)")
    return manifest
