"""DISTREAL's device half: per-batch filter dropout with scatter-back equals a numpy reference of
masked inverted dropout on the full MLP over a fixed batch sequence; the same run on real ONNX
Runtime artifacts (variant `fd`) agrees with it; self-selection follows the quota and the
deadline; bad fronts and assignments are refused with one line naming the value."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from models.artifacts import artifacts_for
from models.builder import build
from models.structure import full_structure, sub_structure
from runtime.backend import NumpyMLP
from runtime.errors import ArtifactError, ConfigError, TrainerError
from runtime.methods import device_method, spec
from runtime.methods import distreal as dm
from runtime.ort import OrtSession
from runtime.profile import parse_profile
from runtime.protocol import Assignment
from runtime.submodel import index_map_for, kept_channels
from runtime.trainer import TrainConfig, Trainer
from tests.unit.methods.conftest import CLASSES, INPUT_SHAPE

FULL = {"fc1": 128, "fc2": 64}
FRONT = {"format": 1, "model": "mlp", "groups": FULL, "vectors": [
    {"drop": {}, "step_ms": 10.0, "score": 0.9},
    {"drop": {"fc1": 0.5, "fc2": 0.25}, "step_ms": 5.0, "score": 0.8},
    {"drop": {"fc1": 0.75, "fc2": 0.75}, "step_ms": 2.0, "score": 0.6},
]}
LR, BATCH = 0.2, 8


def params(**extra: object) -> dict:
    return spec("distreal").params({"front": FRONT, **extra})


def layouts_and_scales(p: dict) -> dict[str, tuple]:
    full = full_structure("mlp", INPUT_SHAPE, CLASSES)
    out = {}
    for text in spec("distreal").artifact_profiles("dense", p):
        structural = parse_profile(text.partition("@")[0])
        sub = sub_structure(full, index_map_for(structural, full.channels))
        scale = {g: FULL[g] / n for g, n in sub.channels.items() if g in FULL and n < FULL[g]}
        out[text] = (build(sub).layout, scale)
    return out


class NumpyOpener:
    def __init__(self, p: dict) -> None:
        self.backends = {k: NumpyMLP(layout, act_scale=scale) for k, (layout, scale) in layouts_and_scales(p).items()}

    def __call__(self, key: str) -> NumpyMLP:
        return self.backends[key]


def make(p: dict, opener, quota=lambda: None) -> dm.Device:
    s = spec("distreal")
    a = Assignment("distreal", "dense", s.artifact_profiles("dense", p), s.extras("dense", p))
    return dm.Device(a, opener, quota_cores=quota)


def w0_for(layout, std: float = 0.3) -> np.ndarray:
    return (np.random.default_rng(3).normal(size=layout.total) * std).astype(np.float32)


def masked_reference(w: dict[str, np.ndarray], x, y, steps: int, seed: int, drop: dict[str, float],
                     every: int = 1) -> dict[str, np.ndarray]:
    """Inverted filter dropout on the full model, written with masks (not slices): a dropped unit
    outputs 0, a kept one its ReLU times C/k; plain SGD on every coordinate (a dropped filter's
    gradient is zero by the chain rule, so it does not move)."""
    w = {k: v.astype(np.float64).copy() for k, v in w.items()}
    order_rng, draw_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    n = len(y)
    per_epoch = -(-n // BATCH)
    order = order_rng.permutation(n)
    masks = {}
    for step in range(steps):
        if step % per_epoch == 0 and step > 0:
            order = order_rng.permutation(n)
        idx = order[(step % per_epoch) * BATCH:(step % per_epoch + 1) * BATCH]
        if step % every == 0:  # the same draws, in the same order, as the device
            for g, rate in drop.items():
                k = kept_channels(1.0 - rate, FULL[g])
                m = np.zeros(FULL[g])
                m[np.sort(draw_rng.choice(FULL[g], k, replace=False))] = FULL[g] / k
                masks[g] = m
        xb, yb = x[idx].reshape(len(idx), -1).astype(np.float64), y[idx]
        z1 = xb @ w["fc1.W"].T + w["fc1.b"]
        a1 = np.maximum(z1, 0) * masks["fc1"]
        z2 = a1 @ w["fc2.W"].T + w["fc2.b"]
        a2 = np.maximum(z2, 0) * masks["fc2"]
        z3 = a2 @ w["out.W"].T + w["out.b"]
        d3 = np.exp(z3 - z3.max(1, keepdims=True))
        d3 /= d3.sum(1, keepdims=True)
        d3[np.arange(len(yb)), yb] -= 1.0
        d3 /= len(yb)
        d2 = (d3 @ w["out.W"]) * (z2 > 0) * masks["fc2"]
        d1 = (d2 @ w["fc2.W"]) * (z1 > 0) * masks["fc1"]
        grads = {"out.W": d3.T @ a2, "out.b": d3.sum(0), "fc2.W": d2.T @ a1, "fc2.b": d2.sum(0),
                 "fc1.W": d1.T @ xb, "fc1.b": d1.sum(0)}
        w = {k: w[k] - LR * grads[k] for k in w}
    return w


def run(method: dm.Device, x, y, w0, steps: int, seed: int = 11) -> np.ndarray:
    trainer = Trainer.on_backend(method.primary, INPUT_SHAPE, CLASSES)
    return trainer.train(w0, x, y, TrainConfig(steps=steps, batch_size=BATCH, lr=LR, seed=seed), method=method).weights


@pytest.mark.parametrize("every", [1, 3])
def test_per_batch_dropout_with_scatter_back_equals_masked_numpy_reference(data, every) -> None:
    x, y = data
    p = spec("distreal").params({"front": {**FRONT, "vectors": [FRONT["vectors"][1]]}, "uniform_rate": -1,
                                 "resample_every": every})
    method = make(p, NumpyOpener(p))
    w0 = w0_for(method.primary.layout)
    got = run(method, x, y, w0, steps=24)
    assert method.steps_per_vector == [24] and method.reloads == -(-24 // every)
    expected = masked_reference(method.primary.layout.split(w0), x, y, 24, 11, {"fc1": 0.5, "fc2": 0.25}, every)
    for name, value in method.primary.layout.split(got).items():
        np.testing.assert_allclose(value, expected[name], atol=2e-5, rtol=0, err_msg=name)
    # Every filter trained over the round (the subset moves per batch), and none is left at w0.
    moved = np.abs(method.primary.layout.split(got)["fc1.W"] - method.primary.layout.split(w0)["fc1.W"]).max(1)
    assert (moved > 0).all()


def test_on_real_onnx_runtime_artifacts(artifact_cache, data) -> None:
    """The `fd` artifacts (a Mul by C/k after each thinned ReLU) train what the numpy backend does."""
    x, y = data
    p = spec("distreal").params({"front": {**FRONT, "vectors": [FRONT["vectors"][2]]}})
    texts = spec("distreal").artifact_profiles("dense", p)
    sets = artifacts_for("mlp", INPUT_SHAPE, CLASSES, texts, cache_dir=artifact_cache)
    sessions = {t: OrtSession(sets[t].directory) for t in texts}
    a = Assignment("distreal", "dense", texts, spec("distreal").extras("dense", p))
    method = device_method(a, sessions.__getitem__)
    w0 = w0_for(method.primary.layout, std=0.1)  # ×4 activations at 75 % dropped: keep the logits sane
    got = run(method, x, y, w0, steps=16)
    expected = run(make(p, NumpyOpener(p)), x, y, w0, steps=16)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    assert np.abs(got - w0).max() > 1e-3


def test_choose_takes_the_best_that_fits_else_the_cheapest() -> None:
    v = FRONT["vectors"]
    assert dm.choose(v, 10, [1.0] * 3, None, 0.9) == (0, 0)  # no deadline: best score
    assert dm.choose(v, 10, [1.0] * 3, 1.0, 0.9) == (0, 1)  # 10 × 10 ms = 0.1 s fits in 0.9 s
    assert dm.choose(v, 10, [10.0] * 3, 0.6, 0.9) == (1, 1)  # 10 × 5 ms × 10 = 0.5 s ≤ 0.54 s
    assert dm.choose(v, 10, [10.0] * 3, 0.1, 0.9) == (2, 2)  # nothing fits: the cheapest
    assert dm.choose(v, 10, [10.0, 20.0, 1.0], 0.6, 0.9) == (2, 1)  # each vector's own slowdown
    # Upgrading needs room to spare: 1.0 s fits in 0.9 × 1.2 but not in 0.85 × 0.9 × 1.2.
    assert dm.choose(v, 10, [10.0] * 3, 1.2, 0.9, current=1) == (1, 1)
    assert dm.choose(v, 10, [10.0] * 3, 1.2, 0.9, current=0) == (0, 1)


class Clocked(NumpyMLP):
    """A numpy backend whose step takes `ms_per_step × size / full size` of real time, as
    a CPU-bound step does; `slow` multiplies it (the quota the test sets)."""

    def __init__(self, layout, act_scale, full_total: int, box: dict) -> None:
        super().__init__(layout, act_scale=act_scale)
        self.share, self.box = layout.total / full_total, box

    def train_step(self, feeds):
        import time

        time.sleep(self.box["ms"] * self.share * self.box["slow"] / 1e3)
        return super().train_step(feeds)


def test_self_selection_follows_the_quota_and_the_deadline(data) -> None:
    """Quota drops to a third mid-task: the device drops to a cheaper vector at the next re-check, before a
    batch was timed under the new quota; restored, it climbs back."""
    x, y = data
    p = params(recheck_every=2)
    box = {"ms": 10.0, "slow": 1.0, "quota": 2.0}
    ls = layouts_and_scales(p)
    full_total = ls["dense"][0].total
    backends = {k: Clocked(layout, scale, full_total, box) for k, (layout, scale) in ls.items()}
    method = make(p, backends.__getitem__, quota=lambda: box["quota"])
    # profiled step times proportional to the parameter share, like the Clocked backends
    for v, text in zip(method.vectors, spec("distreal").vector_artifacts(p), strict=True):
        v["step_ms"] = 10.0 * ls[text][0].total / full_total
    steps = 60
    budget_s = steps * 10.0 / 1e3 * 2.0  # the dense vector fits at full quota, not at a third
    seen: list[tuple[int, int]] = []

    def progress_hook(step: int) -> None:
        if step == 12:
            box["quota"], box["slow"] = 2.0 / 3, 3.0
        if step == 36:
            box["quota"], box["slow"] = 2.0, 1.0

    original = method.before_step

    def before(step, feeds):
        progress_hook(step)
        backend = original(step, feeds)
        seen.append((step, method.current))
        return backend

    method.before_step = before  # type: ignore[method-assign]
    method.deadline_at = time.monotonic() + budget_s
    run(method, x, y, w0_for(method.primary.layout, std=0.05), steps=steps)
    by_step = dict(seen)
    assert by_step[10] == 0  # dense while it fits
    assert by_step[12] != 0 and by_step[14] != 0  # cheaper at the first re-check after the halving
    assert by_step[steps - 1] == 0 or by_step[40] == 0  # back to dense once restored
    report = method.report()
    reasons = {report[k] for k in report if k.endswith(".reason")}
    assert 1.0 in reasons and sum(report[f"steps.{i}"] for i in range(3)) == steps


def test_bad_fronts_and_rates_are_refused_with_the_value(tmp_path) -> None:
    s = spec("distreal")
    cases = [({"front": {**FRONT, "vectors": []}}, "front is empty"),
             ({"front": {**FRONT, "vectors": [{"drop": {"fc1": 1.0}, "step_ms": 1, "score": 0}]}},
              "dropout rate fc1=1.0 is outside"),
             ({"front": {**FRONT, "vectors": [{"drop": {"fc1": -0.1}, "step_ms": 1, "score": 0}]}},
              "dropout rate fc1=-0.1 is outside"),
             ({"front": {**FRONT, "vectors": [{"drop": {"conv9": 0.5}, "step_ms": 1, "score": 0}]}},
              "drops group 'conv9'"),
             ({"front": FRONT, "uniform_rate": 1.5}, "uniform_rate 1.5 is outside"),
             ({"front": FRONT, "recheck_every": 0}, "recheck_every must be"),
             ({"front": FRONT, "resample_every": 0}, "resample_every must be")]
    for table, match in cases:
        with pytest.raises(ConfigError, match=match):
            s.params(table)
    with pytest.raises(ConfigError, match="needs pareto"):
        s.artifact_profiles("dense", s.params({}))
    corrupt = tmp_path / "front.json"
    corrupt.write_text('{"format": 1, "model": "mlp", "gro')
    with pytest.raises(ConfigError, match=r"front.json is corrupt"):
        s.params({"pareto": str(corrupt)})
    with pytest.raises(ConfigError, match="not found"):
        s.params({"pareto": str(tmp_path / "missing.json")})
    good = tmp_path / "good.json"
    good.write_text(json.dumps(FRONT))
    loaded = s.params({"pareto": str(good)})
    assert loaded["pareto"] == "" and len(loaded["front"]["vectors"]) == 3  # embedded: no path travels
    with pytest.raises(ConfigError, match="takes profile 'dense'"):
        s.parse_profile("width=0.5", loaded)


def test_a_vector_without_its_artifact_is_refused() -> None:
    p = params()
    s = spec("distreal")
    extras = s.extras("dense", p)
    extras["vectors"][1]["artifact"] = 7
    with pytest.raises(ArtifactError, match=r"vector 1 \(drop=fc1:0.5\+fc2:0.25\) has no artifact"):
        dm.Device(Assignment("distreal", "dense", s.artifact_profiles("dense", p), extras), NumpyOpener(p))
    wrong = NumpyOpener(p)
    key = s.artifact_profiles("dense", p)[1]
    wrong.backends[key] = wrong.backends["dense"]
    with pytest.raises(ArtifactError, match="has groups"):
        make(p, wrong)


def test_drop_profile_grammar() -> None:
    p = parse_profile("drop=fc2:0.25+fc1:0.5")
    assert p.drop == (("fc1", 0.5), ("fc2", 0.25)) and p.canonical() == "drop=fc1:0.5+fc2:0.25"
    assert parse_profile("drop=fc1:0").canonical() == "dense"
    imap = index_map_for(p, FULL | {"classes": 5})
    assert {g: len(i) for g, i in imap.items()} == {"fc1": 64, "fc2": 48}
    for text, match in (("drop=fc1:1", "dropout rate 'fc1:1' is outside"),
                        ("drop=fc1:-0.5", "dropout rate 'fc1:-0.5' is outside"),
                        ("drop=fc1:x", "'fc1:x' is not a number"), ("drop=fc1", "is not group:rate"),
                        ("drop=fc1:0.5,width=0.5", "do not combine")):
        with pytest.raises(ConfigError, match=match):
            parse_profile(text)
    with pytest.raises(ConfigError, match="'conv9', which is not a hidden group"):
        index_map_for(parse_profile("drop=conv9:0.5"), FULL | {"classes": 5})


def test_a_task_past_its_deadline_is_given_up(data) -> None:
    x, y = data
    p = params()
    method = make(p, NumpyOpener(p))
    method.deadline_at = time.monotonic() - 0.01
    with pytest.raises(TrainerError, match="deadline passed after 0 of 5 steps"):
        run(method, x, y, w0_for(method.primary.layout), steps=5)
    fixed = make(spec("distreal").params({"front": FRONT, "uniform_rate": 0.5}), NumpyOpener(
        spec("distreal").params({"front": FRONT, "uniform_rate": 0.5})))
    fixed.deadline_at = time.monotonic() - 0.01  # Federated Dropout knows no deadline: it trains on
    run(fixed, x, y, w0_for(fixed.primary.layout, std=0.05), steps=5)
