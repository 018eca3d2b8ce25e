"""Chen & Qin's filter relevance through ONNX Runtime against numpy on a fixed batch, and the
relevance file's checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.builder import build
from models.relevance import ensure_relevance_artifact
from models.structure import full_structure
from runtime.errors import ConfigError
from runtime.relevance import Relevance, RelevanceSession, relevance_from_products

K = 5


def _mlp_products(flat: np.ndarray, layout, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """`A · ∂z_y/∂A` after each hidden ReLU of the builder's MLP, by hand in float64."""
    w = {k: v.astype(np.float64) for k, v in layout.split(flat).items()}
    h0 = x.reshape(len(x), -1).astype(np.float64)
    p1 = h0 @ w["fc1.W"].T + w["fc1.b"]
    h1 = np.maximum(p1, 0)
    p2 = h1 @ w["fc2.W"].T + w["fc2.b"]
    h2 = np.maximum(p2, 0)
    g2 = w["out.W"][y]  # ∂z_y/∂h2: the class's classifier row
    g1 = (g2 * (p2 > 0)) @ w["fc2.W"]
    return {"fc1": h1 * g1, "fc2": h2 * g2}


@pytest.fixture(scope="module")
def mlp(artifact_cache: Path):
    structure = full_structure("mlp", (1, 8, 8), K)
    built = build(structure, seed=3)
    rng = np.random.default_rng(7)
    flat = built.init.copy()
    biases = np.concatenate([np.arange(p.offset, p.end) for p in built.layout if p.kind == "bias"])
    flat[biases] = rng.normal(0, 0.3, biases.size).astype(np.float32)  # ReLU masks then matter
    directory = ensure_relevance_artifact(structure, batch=8, cache_dir=artifact_cache)
    return built, flat, RelevanceSession(directory, built.layout)


def test_products_match_numpy_on_a_fixed_batch(mlp) -> None:
    built, flat, session = mlp
    rng = np.random.default_rng(11)
    x = rng.normal(size=(19, 1, 8, 8)).astype(np.float32)  # 19 = two full batches of 8 and a padded one
    y = (np.arange(19) % K).astype(np.int64)
    got = session.products(flat, x, y)
    want = _mlp_products(flat, built.layout, x, y)
    for group in ("fc1", "fc2"):
        assert got[group].shape == want[group].shape
        np.testing.assert_allclose(got[group], want[group], rtol=1e-4, atol=1e-5)
        assert np.abs(want[group]).max() > 0.01  # not a trivially zero comparison


def test_scores_are_relu_spatial_mean_class_mean_layer_normalised(mlp) -> None:
    built, flat, session = mlp
    rng = np.random.default_rng(12)
    x = rng.normal(size=(25, 1, 8, 8)).astype(np.float32)
    y = rng.permutation(np.arange(25) % K).astype(np.int64)
    rel = session.score(flat, x, y)
    prods = _mlp_products(flat, built.layout, x, y)
    for group, prod in prods.items():
        raw = np.zeros((prod.shape[1], K))
        for c in range(K):  # E_{x∈c} ReLU(A·∂z_c/∂A), written out per class
            raw[:, c] = np.maximum(prod[y == c], 0).mean(axis=0)
        np.testing.assert_allclose(rel.scores[group], raw / raw.max(), rtol=1e-4, atol=1e-6)
        assert rel.scores[group].max() == pytest.approx(1.0)


def test_spatial_mean_is_taken_after_the_relu() -> None:
    prod = np.array([[[[2.0, -2.0]], [[1.0, 1.0]]]])  # one sample, 2 channels, 1x2 spatial
    rel = relevance_from_products({"g": prod}, np.array([0]), 1)
    np.testing.assert_allclose(rel["g"][:, 0], [1.0, 1.0])  # mean(ReLU) = 1, not ReLU(mean) = 0


def test_conv_model_scores_every_group(artifact_cache: Path) -> None:
    structure = full_structure("lenet", (1, 8, 8), K)
    built = build(structure, seed=0)
    session = RelevanceSession(ensure_relevance_artifact(structure, 16, artifact_cache), built.layout)
    x = np.random.default_rng(0).normal(size=(20, 1, 8, 8)).astype(np.float32)
    rel = session.score(built.init, x, np.arange(20) % K)
    assert {g: a.shape for g, a in rel.scores.items()} == {"conv1": (6, K), "conv2": (16, K), "fc1": (120, K),
                                                          "fc2": (84, K)}


def test_a_proxy_split_missing_a_class_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"no sample of class\(es\) \[2\]"):
        relevance_from_products({"g": np.ones((2, 3))}, np.array([0, 1]), 3)


def test_relevance_file_round_trip_and_mismatch(tmp_path: Path, mlp) -> None:
    built, flat, session = mlp
    x = np.random.default_rng(1).normal(size=(10, 1, 8, 8)).astype(np.float32)
    rel = session.score(flat, x, np.arange(10) % K, version=4)
    rel.save(tmp_path / "rel.npz")
    back = Relevance.load(tmp_path / "rel.npz", built.layout)
    assert back.version == 4 and all(np.array_equal(back.scores[g], rel.scores[g]) for g in rel.scores)
    other = build(full_structure("mlp", (1, 8, 8), K + 1)).layout  # a model with one class more
    with pytest.raises(ConfigError, match=r"group 'fc1' has scores of shape \(128, 5\), the model needs \(128, 6\)"):
        Relevance.load(tmp_path / "rel.npz", other)
    lenet = build(full_structure("lenet", (1, 8, 8), K)).layout
    with pytest.raises(ConfigError, match="do not match the model's"):
        Relevance.load(tmp_path / "rel.npz", lenet)
