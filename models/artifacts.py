"""Generate ONNX Runtime training artifacts per structure, and cache them by structure hash.

Each cache entry `<cache>/<key>/` holds the training, eval and optimizer models, the
checkpoint and a `manifest.json` (layout in ORT's buffer order, FLOPs, opset, versions, file
hashes). The key hashes the structure, the optimizer and the versions of the builder, onnx and
onnxruntime, so the same structure maps to the same directory and is reused. An entry that
fails verification is rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx

from models.builder import IR_VERSION, MASK_KEPT, OPSET, build
from models.grad_rewrite import rewrite_training_graph
from models.losses import DEFAULT_VARIANT, FILTER_DROPOUT, is_masked, loss_for, parse_variant
from models.structure import BASE_CHANNELS, EXIT_BLOCKS, Structure, full_structure, sub_structure
from runtime import __version__ as orchard_version
from runtime.errors import ArtifactError, ConfigError
from runtime.layout import FloatArray
from runtime.manifest import ARTIFACT_FILES, FORMAT, MANIFEST, file_sha256, manifest_digest, read_manifest
from runtime.ort import onnxruntime_version, training_artifacts_module
from runtime.profile import Profile, parse_profile, split_variant, with_variant
from runtime.submodel import depth_blocks, index_map_for

log = logging.getLogger(__name__)

ONNX_VERSION: str = getattr(onnx, "__version__", "unknown")
# Bump when the generated graphs change, so old cache entries are not reused (models/grad_rewrite.py:
# 3 the ReluGrad rewrite, 4 the MaxPool rewrite, 5 conv input gradients by a forward Conv, 6 a
# pooling window's dY split over its tied maxima, 7 the ResNet branch scale applied to its conv's
# weights).
BUILDER_VERSION = 7
OPTIMIZERS = ("sgd", "adamw")
# The graph around the model: its loss, exits, probes (models/losses.py). The default variant adds
# nothing to the key, so caches from before variants stay valid.


def default_cache_dir() -> Path:
    env = os.environ.get("ORCHARD_CACHE")
    if env:
        return Path(env) / "artifacts"
    return Path.home() / ".cache" / "orchard" / "artifacts"


def artifact_key(structure: Structure, optimizer: str, variant: str = DEFAULT_VARIANT) -> str:
    extra = {"optimizer": optimizer, "builder": BUILDER_VERSION, "onnx": ONNX_VERSION, "ort": onnxruntime_version()}
    if variant != DEFAULT_VARIANT:
        extra["variant"] = variant
    return structure.key(extra)


@dataclass(frozen=True)
class ArtifactSet:
    key: str
    directory: Path
    rebuilt_reason: str | None  # why an existing entry was discarded, if it was


def artifacts_for(model: str, input_shape: tuple[int, ...], num_classes: int, profiles: Iterable[str], *,
                  optimizer: str = "sgd", cache_dir: Path | None = None,
                  variant: str = DEFAULT_VARIANT) -> dict[str, ArtifactSet]:
    """The one place a structural profile (runtime.profile grammar) becomes artifacts: a verified
    artifact set per canonical profile, generated if needed. Profiles of the same structure (a
    rolling and a leading window) share one set. `width=0.5@kd-0.5-2` asks for that profile in
    graph variant `kd-0.5-2` (models/losses.py); without `@` the `variant` argument applies."""
    full = full_structure(model, tuple(input_shape), num_classes)
    out: dict[str, ArtifactSet] = {}
    for text in profiles:
        structural, own = split_variant(text)
        profile = parse_profile(structural)
        name = with_variant(profile.canonical(), own)
        if name not in out:
            structure = profile_structure(full, profile, own or variant)
            out[name] = ensure_artifacts(structure, optimizer, cache_dir, own or variant)
    return out


def profile_structure(full: Structure, profile: Profile, variant: str = DEFAULT_VARIANT) -> Structure:
    """The structure of `profile`'s artifact in graph `variant`: its channels, and for a multi-exit
    variant (exits-…, mask-…) ⌊depth·B⌋ of the model's B block groups."""
    structure = sub_structure(full, index_map_for(profile, full.channels))
    if parse_variant(variant)[0] in ("exits", "mask"):
        blocks = EXIT_BLOCKS.get(full.model)
        if blocks is None:
            raise ConfigError(f"graph variant {variant!r} needs a model with exit heads "
                              f"({', '.join(EXIT_BLOCKS)}), got {full.model!r}")
        return dataclasses.replace(structure, depth=depth_blocks(profile.depth, blocks))
    if profile.depth != 1.0:
        raise ConfigError(f"profile {profile.canonical()!r}: a depth needs a multi-exit graph variant "
                          "(exits-… or mask-…)")
    return structure


def ensure_artifacts(structure: Structure, optimizer: str = "sgd", cache_dir: Path | None = None,
                     variant: str = DEFAULT_VARIANT) -> ArtifactSet:
    """Return a verified artifact directory for `structure`, generating it if needed."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    parse_variant(variant)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = artifact_key(structure, optimizer, variant)
    target = cache / key
    reason = None
    if target.exists():
        try:
            read_manifest(target, verify=True)
            return ArtifactSet(key, target, None)
        except ArtifactError as exc:
            reason = str(exc)
            log.warning("discarding cache entry %s: %s", key, reason)
            shutil.rmtree(target, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        _generate(structure, optimizer, key, tmp, variant)
        try:
            os.rename(tmp, target)  # atomic: readers never see a half-written entry
        except OSError:
            # Another process published the same key first; keep theirs if it verifies.
            read_manifest(target, verify=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ArtifactSet(key, target, reason)


@contextlib.contextmanager
def _native_stderr_captured(what: str) -> Iterator[None]:
    """Hold back native stderr (ORT's gradient builder logs every graph pass at INFO level,
    whatever the default logger severity) and show its tail only if the work fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except Exception as exc:
            os.dup2(saved, 2)
            sink.seek(0)
            lines = [ln for ln in sink.read().decode(errors="replace").splitlines() if "[I:" not in ln]
            tail = " | ".join(lines[-3:])
            raise ArtifactError(f"{what} failed: {exc}" + (f" (ORT said: {tail})" if tail else "")) from exc
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def dropout_scales(structure: Structure) -> dict[str, float]:
    """Inverted filter dropout: each thinned hidden group's activations times C_full / C_kept."""
    full = BASE_CHANNELS[structure.model]
    return {g: full[g] / n for g, n in structure.channels.items() if g in full and n < full[g]}


def _generate(structure: Structure, optimizer: str, key: str, out: Path, variant: str) -> None:
    kind = parse_variant(variant)[0]
    if (structure.depth > 0) != (kind in ("exits", "mask")):
        raise ConfigError(f"graph variant {variant!r} does not fit {structure.model} depth {structure.depth}: "
                          "multi-exit structures take 'exits-…' or 'mask-…', plain ones the others")
    built = build(structure, act_scale=dropout_scales(structure) if variant == FILTER_DROPOUT else None,
                  masked=is_masked(variant))
    outputs = [o.name for o in built.model.graph.output if o.name != MASK_KEPT]
    art = training_artifacts_module()
    optim = art.OptimType.SGD if optimizer == "sgd" else art.OptimType.AdamW
    with _native_stderr_captured(f"generating artifacts for {structure.model} {dict(structure.channels)}"):
        art.generate_artifacts(
            built.model,
            requires_grad=list(built.layout.names),
            frozen_params=[],
            loss=loss_for(variant),
            optimizer=optim,
            artifact_directory=str(out),
            additional_output_names=outputs,
        )
    # ORT's contiguous buffer follows the training graph's parameter inputs. The builder emits
    # initializers in layout order; check that ORT kept it rather than trusting it.
    names = set(built.layout.names)
    training = onnx.load(str(out / "training_model.onnx"), load_external_data=False)
    if rewrite_training_graph(training):
        onnx.save(training, str(out / "training_model.onnx"))
    order = tuple(i.name for i in training.graph.input if i.name in names)
    if order != built.layout.names:
        raise ArtifactError(f"ORT reordered the parameters of {structure.model}: {order[:4]}... != layout")
    manifest = {
        "format": FORMAT,
        "key": key,
        "structure": structure.to_dict(),
        "layout": built.layout.to_dict(),
        "params": built.layout.total,
        "flops_per_sample": built.flops_per_sample,
        "optimizer": optimizer,
        "loss": "cross_entropy" if variant == DEFAULT_VARIANT else variant,
        **({"act_scale": dropout_scales(structure)} if variant == FILTER_DROPOUT else {}),
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "versions": {"orchard": orchard_version, "onnx": ONNX_VERSION, "onnxruntime": onnxruntime_version(),
                     "builder": BUILDER_VERSION},
        "files": {name: file_sha256(out / name) for name in ARTIFACT_FILES},
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def initial_weights(structure: Structure, seed: int = 0) -> FloatArray:
    """Fresh weights for `structure` in layout order (He init from `seed`)."""
    return build(structure, seed).init
