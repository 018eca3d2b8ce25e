"""mpsl's device half: the trainer loop drives a split owner over real compute nodes; the epoch
closes at `trained`, and the owner's M_1 | M_P equal the unsplit model's after the same steps."""

from __future__ import annotations

import numpy as np
import pytest

from models.artifacts import ensure_artifacts
from models.builder import build
from models.split import ensure_part_artifacts, plan_parts
from models.structure import full_structure
from runtime.compute_node import ComputeNode
from runtime.errors import ConfigError
from runtime.methods import device_method, spec
from runtime.ort import OrtSession
from runtime.protocol import Assignment
from runtime.split import PartRunner
from runtime.split_owner import SplitOwner
from runtime.trainer import TrainConfig, Trainer

SHAPE, BATCH, CUTS = (1, 12, 12), 8, ["conv2", "fc1"]


def test_spec_grammar_and_keys() -> None:
    s = spec("mpsl")
    assert s.parse_profile("split", None) == "split"
    with pytest.raises(ConfigError, match="only the profile 'split'"):
        s.parse_profile("dense", None)
    with pytest.raises(ConfigError, match="no key 'cut'"):
        s.params({"cut": ["a"]})
    with pytest.raises(ConfigError, match="cuts must list at least two"):
        s.params({"cuts": ["conv2"]})
    assert s.extras("split", s.params({"batch": 16}))["batch"] == 16


def test_trainer_drives_the_owner_and_matches_the_unsplit_model(artifact_cache) -> None:
    structure = full_structure("cnn", SHAPE, 10)
    built = build(structure)
    dirs = ensure_part_artifacts(structure, CUTS, BATCH, artifact_cache)
    parts = plan_parts(built, CUTS, SHAPE)
    node = ComputeNode(str(dirs[1]), "127.0.0.1:0", ("own0",), lr=0.05)
    node.start()
    try:
        addr = f"127.0.0.1:{node.port}"
        owner = SplitOwner("own0", PartRunner(dirs[0]), PartRunner(dirs[2]), addr, addr, timeout_s=10)
        ends = np.concatenate([built.init[a:b] for p in (parts[0], parts[2]) for a, b in p.full_offsets])
        assignment = Assignment("mpsl", "split", ("owner",), spec("mpsl").extras("split", spec("mpsl").params()))
        method = device_method(assignment, lambda key: owner)
        rng = np.random.default_rng(2)
        x = rng.normal(size=(2 * BATCH, *SHAPE)).astype(np.float32)
        y = rng.integers(0, 10, 2 * BATCH)
        trainer = Trainer.on_backend(owner, SHAPE, 10)
        cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=0.05, seed=4)
        result = trainer.train(ends, x, y, cfg, method=method)
        assert method.report()["batches"] == 2 and owner.epoch == 1
        full = OrtSession(ensure_artifacts(structure, "sgd", artifact_cache).directory)
        ref = Trainer.on_backend(full, SHAPE, 10).train(built.init, x, y, cfg)  # same seed: same batches
        expected = np.concatenate([ref.weights[a:b] for p in (parts[0], parts[2]) for a, b in p.full_offsets])
        np.testing.assert_allclose(result.weights, expected, atol=1e-4)
        assert result.loss_per_step == pytest.approx(ref.loss_per_step, abs=1e-5)
    finally:
        node.stop()


def test_a_plain_backend_is_refused() -> None:
    from runtime.backend import NumpyMLP
    from tests.unit.methods.conftest import mlp_layout

    with pytest.raises(ConfigError, match="needs a split-owner backend"):
        device_method(Assignment("mpsl", "split", ("k",)), lambda key: NumpyMLP(mlp_layout(1.0)))
