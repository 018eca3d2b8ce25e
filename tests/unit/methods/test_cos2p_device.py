"""Co-S²P's device half on real ONNX Runtime artifacts: masks learned on disjoint label sets differ
by more than chance, the mask is stored and reused, the upload is the masked delta, bad tiers and
mask files are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.datasets import load_dataset
from models.methods.cos2p import build
from runtime.errors import ConfigError, LayoutError
from runtime.methods import spec
from runtime.methods.cos2p import (
    Device,
    jaccard,
    mask_indices,
    parse_tier,
    random_mask,
    sample_mask,
    state_file,
)
from runtime.ort import OrtSession
from runtime.protocol import Assignment
from runtime.submodel import kept_channels
from runtime.trainer import TrainConfig, Trainer

SHAPE, CLASSES = (1, 28, 28), 10
PARAMS = spec("cos2p").params({"kd_from_round": 1})
TIER = "keep=0.5,depth=0.5"  # cnn: stage 1 (conv1, conv2) and exit 1


@pytest.fixture(scope="module")
def fashion() -> tuple[np.ndarray, np.ndarray]:
    try:
        ds = load_dataset("fashion-mnist", split="train", n=3000, seed=0)
    except ConfigError as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
    return ds.x, ds.y


@pytest.fixture(scope="module")
def sets(artifact_cache) -> dict:
    return build(PARAMS, "cnn", SHAPE, CLASSES, [TIER], cache_dir=artifact_cache)


def make_device(sets: dict, round_index: int, state: Path | None, mask: str = "learned") -> Device:
    profiles = spec("cos2p").artifact_profiles(TIER, PARAMS)
    sessions = {sets[p].key: OrtSession(sets[p].directory) for p in profiles}
    extras = {**spec("cos2p").extras(TIER, {**PARAMS, "mask": mask}), "round_index": round_index}
    device = Device(Assignment("cos2p", TIER, tuple(sets[p].key for p in profiles), extras), sessions.__getitem__)
    device.state_dir = state
    return device


def learn(sets: dict, x: np.ndarray, y: np.ndarray, state: Path, seed: int, steps: int = 200) -> Device:
    device = make_device(sets, 0, state)
    trainer = Trainer.on_backend(device.primary, SHAPE, CLASSES)
    weights = device.primary.get_params()  # the same start for every device
    trainer.train(weights, x, y, TrainConfig(steps=steps, batch_size=32, lr=0.05, seed=seed), method=device)
    return device


def test_masks_learned_on_disjoint_labels_differ_more_than_chance(sets, fashion, tmp_path) -> None:
    x, y = fashion
    tops, shoes = y < 5, y >= 5  # T-shirt..coat vs sandal..ankle boot
    a = learn(sets, x[tops], y[tops], tmp_path / "a", seed=1)
    b = learn(sets, x[shoes], y[shoes], tmp_path / "b", seed=2)
    assert a.mask is not None and b.mask is not None
    learned = jaccard(a.mask, b.mask)
    rng = np.random.default_rng(0)
    sizes = {g: a.layout.groups[g] for g in a.groups}
    chance = np.mean([jaccard({g: random_mask(n, 0.5, rng) for g, n in sizes.items()},
                              {g: random_mask(n, 0.5, rng) for g, n in sizes.items()}) for _ in range(200)])
    # Two devices with the same label set (other samples) for contrast.
    half = np.flatnonzero(tops)
    c = learn(sets, x[half[::2]], y[half[::2]], tmp_path / "c", seed=3)
    d = learn(sets, x[half[1::2]], y[half[1::2]], tmp_path / "d", seed=4)
    same = jaccard(c.mask, d.mask)
    print(f"jaccard disjoint labels {learned:.3f}, same labels {same:.3f}, random masks {chance:.3f}")
    assert learned < chance - 0.05
    assert same > learned


def test_mask_is_stored_and_reused_and_the_upload_is_the_masked_delta(sets, fashion, tmp_path) -> None:
    x, y = fashion
    first = learn(sets, x[:300], y[:300], tmp_path, seed=0, steps=20)
    assert json.loads((tmp_path / state_file(0.5, first.layout)).read_text())["mask"] is not None
    later = make_device(sets, 5, tmp_path)
    trainer = Trainer.on_backend(later.primary, SHAPE, CLASSES)
    w0 = later.primary.get_params()
    r = trainer.train(w0, x[:300], y[:300], TrainConfig(steps=5, batch_size=32, lr=0.05, seed=0), method=later)
    assert later.mask_steps == 0 and all(np.array_equal(first.mask[g], later.mask[g]) for g in first.groups)
    body = later.pack(w0, r.weights, "delta")
    want = mask_indices(later.layout, later.mask)
    np.testing.assert_array_equal(body.indices, want)
    np.testing.assert_allclose(body.values, (r.weights - w0)[want])
    outside = np.setdiff1d(np.arange(w0.size), want)
    np.testing.assert_array_equal(r.weights[outside], w0[outside])  # pruned units did not move
    assert body.report["model_rate"] == 0.5 and body.report["kd_on"] == 1.0


def test_a_mask_file_of_another_model_is_rejected(sets, tmp_path) -> None:
    device = make_device(sets, 0, tmp_path)
    (tmp_path / state_file(0.5, device.layout)).write_text(
        json.dumps({"layout": "0123abcd", "keep": 0.5, "scores": [], "mask": None}))
    with pytest.raises(LayoutError, match=r"learned for layout '0123abcd' at keep 0\.5"):
        device.start(None, 0.05, np.random.default_rng(0))


def test_random_ablation_and_mask_sizes(sets, tmp_path) -> None:
    device = make_device(sets, 0, tmp_path, mask="random")
    device.start(None, 0.05, np.random.default_rng(0))
    assert device.mask is not None and device.mask_steps == 0
    again = make_device(sets, 1, tmp_path, mask="random")  # the next round reads the stored mask
    again.start(None, 0.05, np.random.default_rng(1))
    assert all(np.array_equal(device.mask[g], again.mask[g]) for g in device.groups)
    for g in device.groups:
        assert device.mask[g].size == kept_channels(0.5, device.layout.groups[g])
    with pytest.raises(LayoutError, match=r"keeps 3 units, keep 0\.5 needs 16"):
        device.set_mask({**device.mask, "conv1": np.arange(3)})


class CountingRng:
    """A real generator that counts its `random` draws (how often a layer was drawn)."""

    def __init__(self, seed: int) -> None:
        self.rng, self.draws = np.random.default_rng(seed), 0

    def random(self, n: int) -> np.ndarray:
        self.draws += 1
        return self.rng.random(n)


def test_an_empty_draw_is_resampled_and_sizes_are_fixed() -> None:
    scores = np.full(8, -5.0, dtype=np.float32)  # σ ≈ 0.0067: a draw of 8 units is empty 95 % of the time
    scores[5] = -4.0
    rng = CountingRng(0)
    kept = sample_mask(scores, 0.25, rng)  # type: ignore[arg-type]
    assert rng.draws > 1  # the empty draws were drawn again
    assert kept.size == 2 and 5 in kept  # ⌈0.25·8⌉ units: the drawn one(s), then by score
    keep_all = sample_mask(np.zeros(4, np.float32), 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(keep_all, np.arange(4))


@pytest.mark.parametrize("text", ["keep=0", "keep=1.5", "depth=-0.5", "keep=abc"])
def test_a_rate_outside_0_1_is_rejected(text: str) -> None:
    with pytest.raises(ConfigError, match="cos2p profile") as err:
        parse_tier(text)
    assert "\n" not in str(err.value)


def test_a_depth_keeping_no_block_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"depth rate 0\.2 keeps no block group of 3"):
        build(PARAMS, "resnet", SHAPE, CLASSES, ["keep=0.5,depth=0.2"])
