"""Chen & Qin's class–filter relevance (methods.md §3.2), scored with ONNX Runtime.

    R[l, f, c] = E_{x ∈ c} [ mean_hw( ReLU( A_{l,f}(x) · ∂z_c/∂A_{l,f}(x) ) ) ],   normalised per layer

`RelevanceSession` runs the relevance artifact (models/relevance.py: probes of ones multiply
each group's activation, so their gradients are `A · ∂z_c/∂A`) on the current global weights
over a proxy split. `Relevance` holds the scores, one (channels, classes) array per hidden
group, and is saved and loaded as an .npz checked against the model's groups.

Server-side code (the Chen & Qin server half), kept in runtime/ because it is ORT code and the
server shares runtime's ORT layer; it never runs on a board.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.errors import ArtifactError, ConfigError
from runtime.layout import FloatArray, ParamLayout
from runtime.record import record

PROBE_PREFIX = "relevance_probe."
SELECTOR = "selector"  # the one-hot (batch, classes) input choosing each sample's class logit
RELEVANCE_MANIFEST = "relevance.json"
RELEVANCE_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
CLASSES = "classes"


def read_relevance_manifest(directory: Path) -> dict[str, Any]:
    """The relevance artifact's manifest, its files' hashes verified; ArtifactError otherwise."""
    path = Path(directory) / RELEVANCE_MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
        files = manifest["files"]
        for name in RELEVANCE_FILES:
            digest = hashlib.sha256((Path(directory) / name).read_bytes()).hexdigest()
            if files[name] != digest:
                raise ArtifactError(f"relevance artifact {directory}: {name} does not match its hash")
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"relevance artifact {directory}: unreadable manifest or files ({exc!r})") from None
    return manifest


def normalise_per_layer(raw: npt.NDArray[np.float64]) -> FloatArray:
    """Scores of one layer divided by the layer's largest (all zero stays zero)."""
    top = float(np.max(raw)) if raw.size else 0.0
    return (raw / top if top > 0 else np.zeros_like(raw)).astype(np.float32)


def relevance_from_products(products: Mapping[str, npt.NDArray[np.floating[Any]]], labels: npt.NDArray[np.int64],
                            num_classes: int) -> dict[str, FloatArray]:
    """The scores from per-sample products `A · ∂z_y/∂A` (group -> (N, C, *spatial)) and labels:
    ReLU, spatial mean, class mean over the samples of each class, layer normalisation. The
    reference the ORT path is tested against is this function fed by a numpy forward/backward."""
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y, minlength=num_classes)[:num_classes]
    if np.any(counts == 0):
        missing = [int(c) for c in np.flatnonzero(counts == 0)]
        raise ConfigError(f"relevance proxy split has no sample of class(es) {missing}")
    onehot = np.zeros((len(y), num_classes), dtype=np.float64)
    onehot[np.arange(len(y)), y] = 1.0
    out: dict[str, FloatArray] = {}
    for group, prod in products.items():
        p = np.maximum(np.asarray(prod, dtype=np.float64), 0.0)
        per_sample = p.reshape(p.shape[0], p.shape[1], -1).mean(axis=2)  # (N, C)
        per_class = (per_sample.T @ onehot) / counts  # (C, K)
        out[group] = normalise_per_layer(per_class)
    return out


@record
class Relevance:
    """Normalised scores per hidden group, (channels, classes), and the global version they came from."""

    scores: Mapping[str, FloatArray]
    version: int = 0

    def check(self, layout: ParamLayout, what: str = "relevance") -> Relevance:
        """ConfigError naming the group and the shapes if the scores do not fit `layout`."""
        k = layout.groups.get(CLASSES)
        hidden = {g: n for g, n in layout.groups.items() if g != CLASSES}
        if set(self.scores) != set(hidden):
            raise ConfigError(f"{what}: groups {sorted(self.scores)} do not match the model's {sorted(hidden)}")
        for group, arr in self.scores.items():
            a = np.asarray(arr)
            if a.shape != (hidden[group], k):
                raise ConfigError(f"{what}: group {group!r} has scores of shape {a.shape}, "
                                  f"the model needs {(hidden[group], k)}")
            if not np.isfinite(a).all() or (a < 0).any():
                raise ConfigError(f"{what}: group {group!r} holds negative or non-finite scores")
        return self

    def save(self, path: Path) -> None:
        arrays = {f"group.{g}": np.asarray(a, dtype=np.float32) for g, a in self.scores.items()}
        with open(path, "wb") as fh:
            np.savez(fh, version=np.asarray(self.version), **arrays)

    @classmethod
    def load(cls, path: Path, layout: ParamLayout) -> Relevance:
        try:
            with np.load(path, allow_pickle=False) as data:
                scores = {k[len("group."):]: data[k].astype(np.float32) for k in data.files if k.startswith("group.")}
                version = int(data["version"]) if "version" in data.files else 0
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"relevance file {path}: unreadable ({exc})") from None
        return cls(scores, version).check(layout, f"relevance file {path}")


class RelevanceSession:
    """The relevance artifact loaded once; `score(weights, x, y)` per recomputation."""

    def __init__(self, directory: Path, layout: ParamLayout, threads: int = 1) -> None:
        import onnxruntime

        from runtime.ort import training_api

        self.directory = Path(directory)
        manifest = read_relevance_manifest(self.directory)
        self.batch = int(manifest["batch"])
        self.probes: dict[str, str] = {g: str(p["probe"]) for g, p in manifest["probes"].items()}
        names = tuple(manifest["params"])
        if names != layout.names:
            raise ConfigError(f"relevance artifact {self.directory}: its parameters {names[:3]}... are not the "
                              f"model's {layout.names[:3]}...")
        self.layout = layout
        api = training_api()
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self._state = api.CheckpointState.load_checkpoint(str(self.directory / "checkpoint"))
            self._module = api.Module(str(self.directory / "training_model.onnx"), self._state,
                                      device="cpu", session_options=opts)
        except Exception as exc:  # ORT raises its own types
            raise ArtifactError(f"relevance artifact {self.directory}: ONNX Runtime could not load it: {exc}") from None
        self._module.train()

    def products(self, weights: FloatArray, x: npt.NDArray[np.float32],
                 y: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[np.float32]]:
        """Per sample and group, `A · ∂z_y/∂A` at `weights` (group -> (N, C, *spatial))."""
        params = self._state.parameters
        for name, value in self.layout.split(self.layout.check(weights, "relevance weights")).items():
            params[name] = np.ascontiguousarray(value, dtype=np.float32)
        k = int(self.layout.groups[CLASSES])
        out: dict[str, list[npt.NDArray[np.float32]]] = {g: [] for g in self.probes}
        for lo in range(0, len(y), self.batch):
            bx = np.asarray(x[lo:lo + self.batch], dtype=np.float32)
            by = np.asarray(y[lo:lo + self.batch], dtype=np.int64)
            n = len(by)
            xb = np.zeros((self.batch, *bx.shape[1:]), dtype=np.float32)
            xb[:n] = bx
            sel = np.zeros((self.batch, k), dtype=np.float32)
            sel[np.arange(n), by] = 1.0  # padding rows select nothing, so their gradients are zero
            self._module(xb, sel)
            for group, probe in self.probes.items():
                grad = params[probe].grad
                out[group].append(np.array(grad[:n], dtype=np.float32, copy=True))
            self._module.lazy_reset_grad()
        return {g: np.concatenate(parts) for g, parts in out.items()}

    def score(self, weights: FloatArray, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64],
              version: int = 0) -> Relevance:
        k = int(self.layout.groups[CLASSES])
        scores = relevance_from_products(self.products(weights, x, y), y, k)
        return Relevance(scores, version).check(self.layout)
