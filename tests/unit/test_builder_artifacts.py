"""Model builders, FLOPs, and the artifact cache (reuse, corruption detection, rebuild)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from models.artifacts import artifact_key, ensure_artifacts, initial_weights
from models.builder import build
from models.structure import MODELS, full_structure, sub_structure
from runtime.errors import ArtifactError, ConfigError, LayoutError
from runtime.manifest import read_manifest
from runtime.ort import OrtSession
from runtime.telemetry import threads_for_quota
from runtime.trainer import TrainConfig, Trainer


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_every_model_builds_and_checks(model, shape):
    built = build(full_structure(model, shape, 10))
    onnx.checker.check_model(built.model, full_check=True)
    assert built.model.ir_version <= 10  # ORT 1.19.2 refuses IR > 10
    assert built.init.shape == (built.layout.total,)
    assert [i.name for i in built.model.graph.initializer] == list(built.layout.names)


def test_flops_match_hand_count():
    # LeNet-5 on 8x8 digits, same padding: conv1 8x8, pool 4x4, conv2 4x4, pool 2x2.
    lenet = build(full_structure("lenet", (1, 8, 8), 10))
    expected = 2 * (1 * 6 * 25 * 64 + 6 * 16 * 25 * 16 + 64 * 120 + 120 * 84 + 84 * 10)
    assert lenet.flops_per_sample == expected
    mlp = build(full_structure("mlp", (1, 4, 4), 5))
    assert mlp.flops_per_sample == 2 * (16 * 128 + 128 * 64 + 64 * 5)


def test_width_shrinks_flops_roughly_quadratically():
    full = full_structure("cnn", (3, 32, 32), 10)
    f1 = build(full).flops_per_sample
    half = sub_structure(full, {g: np.zeros((n + 1) // 2) for g, n in full.channels.items() if g != "classes"})
    ratio = build(half).flops_per_sample / f1
    assert 0.24 < ratio < 0.30  # first conv and classifier scale linearly, the rest quadratically


def test_structure_validation_names_the_value():
    with pytest.raises(ConfigError, match="unknown model 'vit'"):
        full_structure("vit", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="input shape"):
        full_structure("cnn", (8, 8), 10)


def test_same_structure_reuses_one_directory(artifact_cache):
    s = full_structure("lenet", (1, 8, 8), 10)
    a = ensure_artifacts(s, "sgd", artifact_cache)
    mtime = (a.directory / "training_model.onnx").stat().st_mtime_ns
    b = ensure_artifacts(full_structure("lenet", (1, 8, 8), 10), "sgd", artifact_cache)
    assert a.directory == b.directory and b.rebuilt_reason is None
    assert (b.directory / "training_model.onnx").stat().st_mtime_ns == mtime
    assert artifact_key(s, "adamw") != a.key


def test_manifest_records_layout_flops_and_versions(artifact_cache):
    s = full_structure("cnn", (1, 8, 8), 10)
    m = read_manifest(ensure_artifacts(s, "sgd", artifact_cache).directory)
    built = build(s)
    assert m.layout == built.layout and m.flops_per_sample == built.flops_per_sample
    assert m.raw["opset"] == 17 and m.raw["versions"]["onnxruntime"] == "1.19.2"
    assert tuple(int(v) for v in m.raw["versions"]["onnx"].split(".")[:2]) <= (1, 17)


@pytest.mark.parametrize("damage", ["flip-model", "truncate-checkpoint", "edit-manifest", "drop-file"])
def test_corrupted_entry_is_detected_and_rebuilt(tmp_path, damage):
    s = full_structure("mlp", (1, 8, 8), 10)
    d = ensure_artifacts(s, "sgd", tmp_path).directory
    if damage == "flip-model":
        p = d / "eval_model.onnx"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    elif damage == "truncate-checkpoint":
        p = d / "checkpoint"
        p.write_bytes(p.read_bytes()[:100])
    elif damage == "edit-manifest":
        m = json.loads((d / "manifest.json").read_text())
        m["flops_per_sample"] = 1
        (d / "manifest.json").write_text(json.dumps(m))
    else:
        (d / "optimizer_model.onnx").unlink()
    with pytest.raises(ArtifactError, match=str(d)):
        Trainer(d)
    again = ensure_artifacts(s, "sgd", tmp_path)
    assert again.rebuilt_reason is not None and again.directory == d
    Trainer(d)  # loads cleanly after the rebuild


def test_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        Trainer(tmp_path / "nothing")


def test_parameter_buffer_round_trip_and_wrong_length(artifact_cache):
    s = full_structure("resnet", (1, 8, 8), 10)
    session = OrtSession(ensure_artifacts(s, "sgd", artifact_cache).directory)
    w = initial_weights(s, seed=5)
    session.set_params(w)
    np.testing.assert_array_equal(session.get_params(), w)
    with pytest.raises(LayoutError, match=rf"shape \({w.size - 1},\), expected \({w.size},\)"):
        session.set_params(w[:-1])


def test_adamw_artifacts_train(artifact_cache):
    s = full_structure("mlp", (1, 8, 8), 4)
    trainer = Trainer(ensure_artifacts(s, "adamw", artifact_cache).directory)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 256).astype(np.int64)
    x = (rng.normal(size=(256, 1, 8, 8)) + y[:, None, None, None]).astype(np.float32)
    r = trainer.train(initial_weights(s), x, y, TrainConfig(steps=60, batch_size=32, lr=0.01))
    assert np.mean(r.loss_per_step[-10:]) < 0.5 * np.mean(r.loss_per_step[:5])


def test_threads_follow_quota():
    assert threads_for_quota(0.3) == 1
    assert threads_for_quota(1.9) == 2
    assert threads_for_quota(2.0) == 2
    from runtime.errors import TrainerError

    with pytest.raises(TrainerError, match=r"quota -1 cores"):
        threads_for_quota(-1)
