"""MP-SL split parts as ORT artifacts: the split chain trains exactly like the unsplit model."""

from __future__ import annotations

import numpy as np
import pytest

from models.artifacts import ensure_artifacts
from models.builder import build
from models.split import ensure_part_artifacts, layers_of, plan_parts
from models.structure import full_structure
from runtime.errors import ConfigError, ProtocolError
from runtime.ort import OrtSession
from runtime.split import PartRunner

BATCH = 8
LR = 0.05


def _chain_step(runners, x, y):
    """Owner forward on M_1, nodes forward, owner loss on M_P, backward hops, as in §4.2."""
    acts = [x]
    for r in runners[:-1]:
        acts.append(r.forward(acts[-1]))
    loss, _, grad = runners[-1].train_last(acts[-1], y)
    for r, a in zip(reversed(runners[:-1]), reversed(acts[:-1]), strict=True):
        grad = r.backward(a, grad)
    assert grad is None  # the first part has no probe: nothing goes further up
    return loss


@pytest.mark.parametrize(("model", "cuts"), [("cnn", ["conv2", "conv4"]), ("cnn", ["conv1", "conv3", "fc1"]),
                                             ("resnet", ["stem", "block2"])])
def test_split_chain_matches_unsplit_after_two_steps(artifact_cache, model, cuts):
    structure = full_structure(model, (1, 16, 16), 10)
    built = build(structure)
    full = OrtSession(ensure_artifacts(structure, "sgd", artifact_cache).directory)
    full.set_params(built.init)
    full.set_lr(LR)
    parts = plan_parts(built, cuts, structure.input_shape)
    runners = [PartRunner(d) for d in ensure_part_artifacts(structure, cuts, BATCH, artifact_cache)]
    assert [len(p.layers) > 0 for p in parts] == [True] * (len(cuts) + 1)
    for part, runner in zip(parts, runners, strict=True):
        runner.load(np.concatenate([built.init[a:b] for a, b in part.full_offsets]))
        runner.set_lr(LR)
    rng = np.random.default_rng(3)
    # Two steps: the second catches a probe that was not put back to zero after the first.
    for _ in range(2):
        x = rng.normal(size=(BATCH, *structure.input_shape)).astype(np.float32)
        y = rng.integers(0, 10, BATCH)
        ref_loss = float(full.train_step({"input": x, "labels": y})["loss"])
        assert _chain_step(runners, x, y) == pytest.approx(ref_loss, abs=1e-5)
    after = full.get_params()
    moved = np.abs(after - built.init).max()
    assert moved > 1e-3  # the step did something the comparison can miss
    for part, runner in zip(parts, runners, strict=True):
        ref = np.concatenate([after[a:b] for a, b in part.full_offsets])
        np.testing.assert_allclose(runner.weights(), ref, atol=1e-4)


def test_layers_of_cnn_and_resnet_are_whole_blocks():
    cnn = layers_of(build(full_structure("cnn", (1, 28, 28), 10)))
    assert [layer.name for layer in cnn] == ["conv1", "conv2", "conv3", "conv4", "fc1", "out"]
    assert cnn[1].out_shape == (32, 14, 14)  # conv2 ends after its pool: the smaller activation
    res = layers_of(build(full_structure("resnet", (1, 16, 16), 10)))
    assert [layer.name for layer in res] == ["stem", "block1", "block2", "block3", "out"]


@pytest.mark.parametrize(("cuts", "needle"), [(["conv9"], "cut point 'conv9'"), (["out"], "cut point 'out'"),
                                              (["conv3", "conv1"], "in model order")])
def test_bad_cut_is_one_line(cuts, needle):
    built = build(full_structure("cnn", (1, 16, 16), 10))
    with pytest.raises(ConfigError, match=needle) as exc:
        plan_parts(built, cuts, (1, 16, 16))
    assert "\n" not in str(exc.value)


def test_wrong_activation_shape_is_refused(artifact_cache):
    structure = full_structure("cnn", (1, 16, 16), 10)
    runner = PartRunner(ensure_part_artifacts(structure, ["conv2", "conv4"], BATCH, artifact_cache)[1])
    with pytest.raises(ProtocolError, match=r"part 1: input has shape \(4, 32, 8, 8\)"):
        runner.forward(np.zeros((4, 32, 8, 8), np.float32))
