"""Multi-exit models, the Co-S²P training loss and the mask-learning graph, in real ONNX Runtime.

References: the loss against numpy on a fixed batch (to 1e-4), the masked forward against the
physically sliced submodel, and the straight-through score gradient against its closed form."""

from __future__ import annotations

import numpy as np
import pytest

from models.artifacts import ensure_artifacts
from models.builder import REF_PREFIX, SAMPLE_PREFIX, build, exit_name
from models.losses import parse_variant
from models.structure import EXIT_BLOCKS, Structure, full_structure, sub_structure
from runtime.backend import INPUT, KD_GATE, KEEP_TARGET, LABELS, LOGITS
from runtime.errors import ConfigError
from runtime.ort import OrtSession
from runtime.submodel import Submodel

SHAPE = (1, 12, 12)
CLASSES = 6


def structure(model: str, depth: int) -> Structure:
    full = full_structure(model, SHAPE, CLASSES)
    return Structure(full.model, full.input_shape, full.channels, depth)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def reference_loss(logits: np.ndarray, exits: list[np.ndarray], y: np.ndarray, gate: float, gamma: float,
                   temperature: float) -> float:
    """CE(z_L) + Σ_{i<L} [CE(z_i) + gate·γ·T²·mean_elements(p_L (log p_L − log q_i))]."""
    rows = np.arange(len(y))
    total = -_log_softmax(logits)[rows, y].mean()
    log_t = _log_softmax(logits / temperature)
    for z in exits:
        log_s = _log_softmax(z / temperature)
        kl = (np.exp(log_t) * (log_t - log_s)).mean()
        total += -_log_softmax(z)[rows, y].mean() + gate * gamma * temperature**2 * kl
    return float(total)


def test_depth_and_exit_index_are_checked() -> None:
    with pytest.raises(ConfigError, match="exit index 3 is beyond the model's depth"):
        structure("cnn", 3)
    with pytest.raises(ConfigError, match="model 'mlp' has no exit heads"):
        Structure("mlp", SHAPE, full_structure("mlp", SHAPE, CLASSES).channels, 1)
    with pytest.raises(ConfigError, match=r"unknown graph variant 'exits-0\.5'"):
        parse_variant("exits-0.5")


@pytest.mark.parametrize("model", sorted(EXIT_BLOCKS))
def test_a_shallower_model_is_a_prefix_of_the_deeper_one(model: str) -> None:
    deepest = build(structure(model, EXIT_BLOCKS[model])).layout
    for depth in range(1, EXIT_BLOCKS[model]):
        layout = build(structure(model, depth)).layout
        assert deepest.params[:len(layout.params)] == layout.params
        assert layout.params[-2].name == f"{exit_name(depth)}.W"
    plain = build(full_structure(model, SHAPE, CLASSES)).layout
    assert [p.name for p in deepest.params if not p.name.startswith("exit")] == list(plain.names)


@pytest.mark.parametrize("model", sorted(EXIT_BLOCKS))
def test_multi_exit_distillation_loss_matches_numpy(model: str, artifact_cache) -> None:
    depth = EXIT_BLOCKS[model]
    gamma, temperature = 0.5, 3.0
    s = OrtSession(ensure_artifacts(structure(model, depth), "sgd", artifact_cache,
                                    f"exits-{gamma:g}-{temperature:g}").directory)
    rng = np.random.default_rng(3)
    weights = (build(structure(model, depth), seed=1).init * (2.0 if model == "cnn" else 1.0)).astype(np.float32)
    s.set_params(weights)
    x = rng.normal(size=(16, *SHAPE)).astype(np.float32)
    y = rng.integers(0, CLASSES, 16).astype(np.int64)
    for gate in (0.0, 1.0):
        out = s.eval_step({INPUT: x, LABELS: y, KD_GATE: np.array([gate], np.float32)})
        exits = [np.asarray(out[exit_name(i)]) for i in range(1, depth)]
        assert len(exits) == depth - 1 and all(e.shape == (16, CLASSES) for e in exits)
        want = reference_loss(np.asarray(out[LOGITS]), exits, y, gate, gamma, temperature)
        assert float(out["loss"]) == pytest.approx(want, abs=1e-4)
    assert abs(want - reference_loss(np.asarray(out[LOGITS]), exits, y, 0.0, gamma, temperature)) > 1e-3


def _mask_feeds(weights: dict[str, np.ndarray], samples: dict[str, np.ndarray], scores: dict[str, np.ndarray],
                x: np.ndarray, y: np.ndarray, keep: float) -> dict[str, np.ndarray]:
    feeds = {INPUT: x, LABELS: y, KEEP_TARGET: np.array([keep], np.float32), **weights}
    for group in samples:
        feeds[SAMPLE_PREFIX + group] = samples[group]
        feeds[REF_PREFIX + group] = scores[group]
    return feeds


@pytest.mark.parametrize(("model", "depth"), [("cnn", 2), ("resnet", 2), ("resnet", 3)])
def test_masked_forward_equals_the_sliced_submodel(model: str, depth: int, artifact_cache) -> None:
    st = structure(model, depth)
    mask_art = OrtSession(ensure_artifacts(st, "sgd", artifact_cache, "mask-1").directory)
    dense = build(st, seed=2)
    rng = np.random.default_rng(4)
    samples = {p.axes[0].group: (rng.random(p.size) < 0.6).astype(np.float32) for p in mask_art.layout}
    for m in samples.values():
        m[0] = 1.0  # no empty layer
    scores = {g: rng.normal(size=m.size).astype(np.float32) for g, m in samples.items()}
    mask_art.set_params(mask_art.layout.join({f"mask.{g}": v for g, v in scores.items()}))
    x = rng.normal(size=(5, *SHAPE)).astype(np.float32)
    y = rng.integers(0, CLASSES, 5).astype(np.int64)
    feeds = _mask_feeds(dense.layout.split(dense.init), samples, scores, x, y, 0.5)
    masked_logits = np.asarray(mask_art.eval_step(feeds)[LOGITS])

    imap = {g: np.flatnonzero(m).astype(np.int64) for g, m in samples.items()}
    sub = Submodel.of(dense.layout, imap)
    sliced = OrtSession(ensure_artifacts(sub_structure(st, imap), "sgd", artifact_cache, "exits-0.5-3").directory)
    assert sliced.layout == sub.sub_layout
    sliced.set_params(sub.extract(dense.init))
    out = sliced.eval_step({INPUT: x, LABELS: y, KD_GATE: np.zeros(1, np.float32)})
    np.testing.assert_allclose(np.asarray(out[LOGITS]), masked_logits, atol=1e-4)


def test_score_gradient_is_the_straight_through_estimator(artifact_cache) -> None:
    """With zero weights the CE term does not depend on the mask, so one SGD step moves each
    score by −lr·λ1·sign(mean m − ρ)·σ(s)·σ'(s)/N (∂m/∂σ(s) = σ(s), the authors' `Bern`)."""
    st = structure("cnn", 1)
    lam, lr, keep = 2.0, 0.5, 0.25
    art = OrtSession(ensure_artifacts(st, "sgd", artifact_cache, f"mask-{lam:g}").directory)
    art.set_lr(lr)
    dense = build(st)
    rng = np.random.default_rng(5)
    scores = {p.axes[0].group: rng.normal(size=p.size).astype(np.float32) for p in art.layout}
    samples = {g: (rng.random(v.size) < 0.7).astype(np.float32) for g, v in scores.items()}
    flat = art.layout.join({f"mask.{g}": v for g, v in scores.items()})
    art.set_params(flat)
    zeros = {k: np.zeros_like(v) for k, v in dense.layout.split(dense.init).items()}
    x = rng.normal(size=(4, *SHAPE)).astype(np.float32)
    feeds = _mask_feeds(zeros, samples, scores, x, np.zeros(4, np.int64), keep)
    loss = float(art.train_step(feeds)["loss"])
    n = sum(v.size for v in samples.values())
    kept = sum(v.sum() for v in samples.values()) / n
    assert loss == pytest.approx(np.log(CLASSES) + lam * abs(kept - keep), abs=1e-5)
    s = flat.astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-s))
    want = s - lr * lam * np.sign(kept - keep) * p * p * (1.0 - p) / n
    np.testing.assert_allclose(art.get_params(), want, atol=1e-6)
