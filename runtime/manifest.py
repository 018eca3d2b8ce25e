"""The manifest of a training-artifact directory, and its integrity check.

Artifacts are generated on the host (`models.artifacts`) and read here, on the board. The
manifest records the parameter layout (in ONNX Runtime's buffer order), FLOPs, versions and a
SHA-256 of every file plus of the manifest itself, so a torn copy or a corrupted cache entry is
refused with the file it concerns instead of training on garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.errors import ArtifactError, LayoutError
from runtime.layout import ParamLayout
from runtime.record import record

MANIFEST = "manifest.json"
FORMAT = 1
ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


@record
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


def install_artifact(cache: Path, key: str, files: Mapping[str, bytes], digest: str) -> bool:
    """Verify a pushed artifact and publish it into `cache/key` atomically; False if it was there.

    It must be exactly what the task asked for: its manifest names `key` and hashes to `digest`
    (the task's `artifact_digests[key]`), and every file matches the manifest. Anything else is
    an ArtifactError and leaves the cache untouched."""
    target = Path(cache) / key
    if target.exists():
        return False
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        manifest = read_manifest(tmp)
        got = manifest_digest(manifest.raw)
        if manifest.key != key or got != digest:
            raise ArtifactError(f"artifact {key}: manifest is for key {manifest.key!r} with hash {got[:12]}..., "
                                f"the task asked for {digest[:12]}...; refused")
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


# Every artifact of a task arrives before the task, up to what the server pushes to one device at
# once (server/guard.py ARTIFACT_BURST; a test keeps the two equal). At 4, a DISTREAL task (one
# artifact per vector of its front: 8) or FjORD-KD (9) lost its first artifacts and waited forever.
STAGED_LIMIT = 12


class StagedArtifacts:
    """Authenticated artifacts held, at most `limit`, until a task names them with their manifest
    hash: the server pushes artifacts just before the task that needs them."""

    def __init__(self, cache: Path, limit: int = STAGED_LIMIT) -> None:
        self.cache, self.limit = Path(cache), limit
        self._held: dict[str, Mapping[str, bytes]] = {}

    def hold(self, key: str, files: Mapping[str, bytes]) -> list[str]:
        """Keep one; returns the keys dropped to stay within the limit (oldest first)."""
        self._held.pop(key, None)
        self._held[key] = files
        dropped = list(self._held)[: max(0, len(self._held) - self.limit)]
        for old in dropped:
            del self._held[old]
        return dropped

    def install(self, keys: tuple[str, ...], digests: Mapping[str, str], who: str) -> list[str]:
        """Install the held artifacts among `keys`, each checked against its digest; returns the
        keys installed. ArtifactError if one is held but the task gave no hash for it."""
        installed = []
        for key in keys:
            files = self._held.pop(key, None)
            if files is None:
                continue
            if key not in digests:
                raise ArtifactError(f"{who} names artifact {key} without its manifest hash")
            if install_artifact(self.cache, key, files, digests[key]):
                installed.append(key)
        return installed
