"""FjORD's device half: per-batch width sampling visits every allowed width, and the returned
p_max model equals an independent numpy reference of ordered dropout over the same batches; the
same run on real ONNX Runtime artifacts agrees with it."""

from __future__ import annotations

import numpy as np
import pytest

from models.artifacts import artifacts_for, initial_weights
from models.structure import full_structure
from runtime.errors import ArtifactError, ConfigError
from runtime.methods import device_method, spec
from runtime.methods.fjord import Device
from runtime.ort import OrtSession
from runtime.protocol import Assignment
from runtime.submodel import kept_channels
from runtime.trainer import TrainConfig, Trainer
from tests.unit.methods.conftest import CLASSES, INPUT_SHAPE, Opener, mlp_layout
from tests.unit.mlp_reference import mlp_ce_grads

WIDTHS = [0.5, 0.25, 0.125]  # a p_max = 0.5 device of P = {0.125, 0.25, 0.5, 1}
KEYS = tuple(f"w{w:g}" for w in WIDTHS)
FULL = {"fc1": 128, "fc2": 64}


def assignment(resample_every: int = 1) -> Assignment:
    return Assignment("fjord", "p_max=0.5", KEYS, {"widths": WIDTHS, "resample_every": resample_every})


def train(opener: Opener, x: np.ndarray, y: np.ndarray, w0: np.ndarray, steps: int, k: int = 1,
          seed: int = 7) -> tuple[np.ndarray, Device]:
    method = device_method(assignment(k), opener)
    assert isinstance(method, Device)
    trainer = Trainer.on_backend(method.primary, INPUT_SHAPE, CLASSES)
    result = trainer.train(w0, x, y, TrainConfig(steps=steps, batch_size=8, lr=0.2, seed=seed), method=method)
    return result.weights, method


def reference(tensors: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, steps: int, seed: int) -> dict:
    """Ordered dropout written out: slice W[:k_out, :k_in] per sampled width, SGD, write back."""
    w = {k: v.astype(np.float64).copy() for k, v in tensors.items()}
    order_rng, width_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    n, batch = len(y), 8
    per_epoch = -(-n // batch)
    order = order_rng.permutation(n)
    for step in range(steps):
        if step % per_epoch == 0 and step > 0:
            order = order_rng.permutation(n)
        idx = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        p = WIDTHS[int(width_rng.integers(len(WIDTHS)))]
        k1, k2 = kept_channels(p, FULL["fc1"]), kept_channels(p, FULL["fc2"])
        sl = {"fc1.W": np.s_[:k1, :], "fc1.b": np.s_[:k1], "fc2.W": np.s_[:k2, :k1], "fc2.b": np.s_[:k2],
              "out.W": np.s_[:, :k2], "out.b": np.s_[:]}
        s = {k: w[k][sl[k]] for k in w}
        grads = mlp_ce_grads(s, x[idx], y[idx])
        for k in w:
            w[k][sl[k]] = s[k] - 0.2 * grads[k]
    return w


@pytest.fixture
def opener() -> Opener:
    return Opener({key: mlp_layout(w) for key, w in zip(KEYS, WIDTHS, strict=True)})


def test_every_allowed_width_is_visited_and_reported(opener, data) -> None:
    x, y = data
    w0 = initial_weights_of(opener)
    _, method = train(opener, x, y, w0, steps=60)
    report = method.report()
    assert set(report) == {"steps_width_0.5", "steps_width_0.25", "steps_width_0.125", "width_switches"}
    counts = [report[f"steps_width_{w:g}"] for w in WIDTHS]
    assert sum(counts) == 60 and min(counts) > 0
    assert sorted(opener.opened) == sorted(KEYS)  # one backend per width, opened once each


def initial_weights_of(opener: Opener) -> np.ndarray:
    rng = np.random.default_rng(3)
    layout = opener.backends[KEYS[0]].layout
    return (rng.normal(size=layout.total) * 0.3).astype(np.float32)


def test_p_max_model_equals_numpy_ordered_dropout(opener, data) -> None:
    x, y = data
    w0 = initial_weights_of(opener)
    got, _ = train(opener, x, y, w0, steps=20, seed=11)
    layout = opener.backends[KEYS[0]].layout
    expected = reference(layout.split(w0), x, y, steps=20, seed=11)
    for name, value in layout.split(got).items():
        np.testing.assert_allclose(value, expected[name], atol=1e-5, rtol=0, err_msg=name)
    # Not a vacuous match: the narrowest slice and the rest of the p_max model both moved.
    assert np.abs(got - w0).max() > 1e-3


def test_resample_every_k_holds_the_width_for_k_batches(opener, data) -> None:
    x, y = data
    w0 = initial_weights_of(opener)
    _, every = train(opener, x, y, w0, steps=40, k=1)
    _, held = train(opener, x, y, w0, steps=40, k=10)
    assert held.switches <= 4 < every.switches  # at most one load per block of 10


def test_on_real_onnx_runtime_artifacts(artifact_cache, data) -> None:
    x, y = data
    sets = artifacts_for("mlp", INPUT_SHAPE, CLASSES, [f"width={w:g}" for w in WIDTHS], cache_dir=artifact_cache)
    dirs = {key: sets[f"width={w:g}"].directory for key, w in zip(KEYS, WIDTHS, strict=True)}
    sessions: dict[str, OrtSession] = {}

    def open_ort(key: str) -> OrtSession:
        return sessions.setdefault(key, OrtSession(dirs[key]))

    w0 = initial_weights(full_structure("mlp", INPUT_SHAPE, CLASSES), seed=2)
    w0 = w0[: sessions.setdefault(KEYS[0], OrtSession(dirs[KEYS[0]])).layout.total]  # any start point will do
    method = device_method(assignment(), open_ort)
    trainer = Trainer.on_backend(method.primary, INPUT_SHAPE, CLASSES)
    got = trainer.train(w0, x, y, TrainConfig(steps=20, batch_size=8, lr=0.2, seed=11), method=method).weights
    numpy_opener = Opener({key: mlp_layout(w) for key, w in zip(KEYS, WIDTHS, strict=True)})
    expected, _ = train(numpy_opener, x, y, w0, steps=20, seed=11)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)


def test_bad_assignments_are_refused(opener) -> None:
    with pytest.raises(ConfigError, match="3 artifacts for widths"):
        Device(Assignment("fjord", "p_max=0.5", KEYS, {"widths": [0.5, 0.25]}), opener)
    wrong = Opener({"w0.5": mlp_layout(0.5), "wide": mlp_layout(1.0)})
    with pytest.raises(ArtifactError, match="wider than the p_max artifact"):
        Device(Assignment("fjord", "p_max=0.5", ("w0.5", "wide"), {"widths": [0.5, 0.25]}), wrong)


def test_spec_profiles_and_keys() -> None:
    s = spec("fjord")
    params = s.params({"widths": [0.25, 0.5, 1.0]})
    assert s.parse_profile("p_max=0.5", params) == "p_max=0.5" and s.parse_profile("dense", params) == "dense"
    assert s.artifact_profiles("p_max=0.5", params) == ("width=0.5", "width=0.25")
    assert s.extras("dense", params) == {"widths": [1.0, 0.5, 0.25], "resample_every": 1, "distill": False}
    kd = s.params({"widths": [0.25, 0.5, 1.0], "distill": True, "distill_alpha": 0.5, "distill_temperature": 2})
    assert s.artifact_profiles("p_max=0.5", kd) == ("width=0.5", "width=0.25@kd-0.5-2")
    for table, match in (({"widths": [0.5]}, "must include 1.0"), ({"resample_every": 0}, "resample_every"),
                         ({"distil": True}, "has no key 'distil'"), ({"widths": "0.5"}, "list of numbers"),
                         ({"distill": 1}, "distill must be true or false"),
                         ({"distill_alpha": 1.5}, "distill_alpha must be in"),
                         ({"distill_temperature": 0}, "distill_temperature must be > 0")):
        with pytest.raises(ConfigError, match=match):
            s.params(table)
    for text, match in (("p_max=0.3", "not one of the widths"), ("width=0.5", "takes profiles 'p_max"),
                        ("p_max=x", "not a number")):
        with pytest.raises(ConfigError, match=match):
            s.parse_profile(text, params)


def _kd_run(artifact_cache, data, alpha: float, distill: bool) -> tuple[np.ndarray, list[float], Device]:
    x, y = data
    params = spec("fjord").params({"widths": [0.125, 0.25, 0.5, 1.0], "distill": distill, "distill_alpha": alpha,
                                   "distill_temperature": 2.0})
    texts = spec("fjord").artifact_profiles("p_max=0.5", params)
    sets = artifacts_for("mlp", INPUT_SHAPE, CLASSES, texts, cache_dir=artifact_cache)
    sessions = {t: OrtSession(sets[t].directory) for t in texts}
    assignment = Assignment("fjord", "p_max=0.5", texts, spec("fjord").extras("p_max=0.5", params))
    method = device_method(assignment, sessions.__getitem__)
    assert isinstance(method, Device)
    w0 = (np.random.default_rng(5).normal(size=method.primary.layout.total) * 0.3).astype(np.float32)
    r = Trainer.on_backend(method.primary, INPUT_SHAPE, CLASSES).train(
        w0, x, y, TrainConfig(steps=16, batch_size=8, lr=0.2, seed=11), method=method)
    return r.weights, list(r.loss_per_step), method


def test_distillation_with_alpha_zero_is_plain_ordered_dropout(artifact_cache, data) -> None:
    """The KD graphs, the teacher feed and the extra copies change nothing when α = 0."""
    plain, _, _ = _kd_run(artifact_cache, data, 0.0, distill=False)
    kd0, _, method = _kd_run(artifact_cache, data, 0.0, distill=True)
    assert method.distill and method.assignment is not None
    assert "@kd-0-2" in method.assignment.artifact_keys[1]
    np.testing.assert_allclose(kd0, plain, atol=2e-5, rtol=0)
    kd, _, _ = _kd_run(artifact_cache, data, 0.7, distill=True)
    assert np.abs(kd - plain).max() > 1e-3  # and the teacher does move the student when α > 0


def test_distillation_loss_is_the_fjord_kd_formula(artifact_cache, data) -> None:
    """One KD step's loss equals (1 − α)·CE + α·T²·KL(softmax(t/T) ‖ softmax(z/T)) in numpy."""
    from runtime.backend import INPUT, LABELS, LOGITS, TEACHER

    x, y = data
    params = spec("fjord").params({"widths": [0.5, 1.0], "distill": True, "distill_alpha": 0.3,
                                   "distill_temperature": 2.0})
    texts = spec("fjord").artifact_profiles("dense", params)
    sets = artifacts_for("mlp", INPUT_SHAPE, CLASSES, texts, cache_dir=artifact_cache)
    student = OrtSession(sets[texts[1]].directory)
    assert "teacher" in student._input_names
    rng = np.random.default_rng(2)
    ws = (rng.normal(size=student.layout.total) * 0.3).astype(np.float32)
    student.set_params(ws)
    teacher = rng.normal(size=(8, CLASSES)).astype(np.float32)
    feeds = {INPUT: x[:8], LABELS: y[:8], TEACHER: teacher}
    logits = np.asarray(student.eval_step(feeds)[LOGITS], np.float64)  # the student before its step
    loss = float(student.train_step(feeds)["loss"])  # the loss of the same forward

    def log_softmax(a: np.ndarray) -> np.ndarray:
        a = a - a.max(1, keepdims=True)
        return a - np.log(np.exp(a).sum(1, keepdims=True))

    ce = -log_softmax(logits)[np.arange(8), y[:8]].mean()
    lt, ls = log_softmax(teacher.astype(np.float64) / 2.0), log_softmax(logits / 2.0)
    kl = (np.exp(lt) * (lt - ls)).sum(1).mean()
    assert abs(loss - (0.7 * ce + 0.3 * 4.0 * kl)) < 1e-4
