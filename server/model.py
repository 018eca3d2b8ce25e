"""The server's view of the model: global layout and weights, and one artifact per profile.

The host side (`models/`, which needs onnx) generates artifacts and writes `artifacts.json`:

    {"model": "lenet", "init": "init.npy", "global": "<artifact dir>",
     "profiles": {"dense": "<artifact dir>", "width=0.5": "<artifact dir>"}, "auxiliary": []}

(`auxiliary`, optional: profiles whose artifacts are sent to devices but are no slice of the
global model the server can name.)

(paths relative to the file), and optionally `"extra": {"relevance": "<dir>"}` (artifacts a
method's server half runs itself, not task profiles) and `"proxy": "proxy.npz"` (a proxy split
(x, y) a method's server half scores on). The server only reads them, so it runs without onnx, like a board.
"""

from __future__ import annotations

import json
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from runtime.errors import ConfigError, DatasetError, OrchardError
from runtime.layout import FloatArray, ParamLayout
from runtime.manifest import ARTIFACT_FILES, MANIFEST, Manifest, read_manifest
from runtime.profile import parse_profile, split_variant, with_variant
from runtime.submodel import IndexArray, Submodel, index_map_for

_SUBMODEL_CACHE = 256  # rolling windows make one submodel per (profile, round)


@dataclass(frozen=True)
class ProfileArtifact:
    profile: str
    directory: Path
    manifest: Manifest


class ServerModel:
    """Implements the engine's `ModelOps`, plus what the MQTT service needs to build tasks."""

    def __init__(self, artifacts_json: Path | str) -> None:
        path = Path(artifacts_json)
        try:
            spec = json.loads(path.read_text())
            base = path.parent
            self.model_name = str(spec["model"])
            self.global_dir = base / spec["global"]
            self.global_manifest = read_manifest(self.global_dir)
            init = np.load(base / spec["init"], allow_pickle=False)
            profiles = {_canonical(k): base / v for k, v in spec["profiles"].items()}
            auxiliary = {_canonical(str(k)) for k in spec.get("auxiliary", [])}
            self.extra_dirs: dict[str, Path] = {str(k): base / v for k, v in spec.get("extra", {}).items()}
            self.proxy_path: Path | None = base / spec["proxy"] if spec.get("proxy") else None
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: {exc.filename} not found") from None
        except OSError as exc:  # a directory where a file belongs, no permission, ...
            raise ConfigError(f"{path}: cannot read {exc.filename or 'it'}: {exc.strerror or exc}") from None
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: malformed artifacts description: {exc!r}") from None
        self.layout: ParamLayout = self.global_manifest.layout
        self.init: FloatArray = self.layout.check(init.astype(np.float32), f"{path}: initial weights")
        self.profiles: dict[str, ProfileArtifact] = {}
        for profile, directory in profiles.items():
            self.profiles[profile] = ProfileArtifact(profile, directory, read_manifest(directory))
        # Artifacts a method sends but the server cannot slice (a mask-learning graph, a slice whose
        # channels each device picks): never checked against or scored on the global model.
        self.auxiliary = frozenset(auxiliary)
        self._submodels: OrderedDict[tuple[str, tuple[tuple[str, bytes], ...]], Submodel] = OrderedDict()
        for profile, art in self.profiles.items():
            if profile in self.auxiliary:
                continue
            sub = self.submodel(profile, 0)
            if sub.sub_layout != art.manifest.layout:
                raise ConfigError(f"{path}: artifact for {profile!r} does not match the global layout's slice")

    @property
    def n_params(self) -> int:
        return self.layout.total

    def submodel(self, profile: str, round_index: int) -> Submodel:
        """The slice of structural `profile` (a graph variant after `@` does not change it)."""
        structural, variant = split_variant(profile)
        p = parse_profile(structural)
        name = with_variant(p.canonical(), variant)
        if name not in self.profiles or name in self.auxiliary:
            raise ConfigError(f"profile {profile!r} has no artifact the server can slice; known: "
                              f"{', '.join(k for k in self.profiles if k not in self.auxiliary)}")
        index_map = index_map_for(p, self.layout.groups, round_index)
        # A model holding fewer tensors than the global (a depth-cut multi-exit model, or a plain
        # one next to a multi-exit global) is the slice of the tensors its artifact names.
        names = self.profiles[name].manifest.layout.names
        tensors = None if names == self.layout.names else names
        # Keyed by the channel sets themselves, so a window that does not move with the round
        # reuses one Submodel and one that does (FedRolex) gets one per distinct window.
        key = (name, tuple((g, idx.tobytes()) for g, idx in sorted(index_map.items())))
        sub = self._submodels.get(key)
        if sub is None:
            sub = Submodel.of(self.layout, index_map, tensors)
            self._submodels[key] = sub
            while len(self._submodels) > _SUBMODEL_CACHE:
                self._submodels.popitem(last=False)
        return sub

    def indices_for(self, profile: str, round_index: int) -> IndexArray | None:
        sub = self.submodel(profile, round_index)
        return None if sub.is_full else sub.indices

    def artifact(self, profile: str) -> ProfileArtifact:
        art = self.profiles.get(_canonical(profile))
        if art is None:
            raise ConfigError(f"profile {profile!r} has no artifact; known: {', '.join(self.profiles)}")
        return art

    def artifact_key(self, profile: str) -> str:
        return self.artifact(profile).manifest.key

    def by_key(self, key: str) -> ProfileArtifact:
        for art in self.profiles.values():
            if art.manifest.key == key:
                return art
        raise ConfigError(f"no artifact with key {key!r}")

    def artifact_files(self, key: str) -> dict[str, bytes]:
        """The files of artifact `key`, for an Artifact frame."""
        d = self.by_key(key).directory
        try:
            return {name: (d / name).read_bytes() for name in (*ARTIFACT_FILES, MANIFEST)}
        except OSError as exc:
            raise OrchardError(f"artifact {d} unreadable: {exc}") from None


def _canonical(text: str) -> str:
    structural, variant = split_variant(text)
    return with_variant(parse_profile(structural).canonical(), variant)


def load_eval_data(path: Path) -> tuple[FloatArray, npt.NDArray[np.int64]]:
    """The held-out split (`x`, `y` arrays of an .npz); DatasetError with one line otherwise."""
    where = f"eval_data {str(path)[:200]}"
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise DatasetError(f"{where}: a single .npy array, expected an .npz with x and y")
            missing = [k for k in ("x", "y") if k not in data.files]
            if missing:
                raise DatasetError(f"{where}: no {' or '.join(missing)} array (it holds {sorted(data.files)[:8]})")
            x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    except FileNotFoundError:
        raise DatasetError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise DatasetError(f"{where}: is a directory, expected an .npz file") from None
    except OSError as exc:
        raise DatasetError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except (ValueError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        # numpy refuses pickled objects (allow_pickle=False) and non-npy content with ValueError.
        raise DatasetError(f"{where}: not an .npz of numeric arrays ({str(exc)[:120]})") from None
    if x.ndim < 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise DatasetError(f"{where}: x {x.shape} and y {y.shape} do not pair up as N samples and N labels")
    return x, y
