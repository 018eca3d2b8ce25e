"""chenqin's server half: relevance-chosen sub-models per class subset, the harvest through the
engine, rescoring after merges, indices in the checkpoint, and each bad input as one line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from models.builder import build
from models.relevance import ensure_relevance_artifact
from models.structure import full_structure
from runtime.errors import ConfigError
from runtime.protocol import Update
from runtime.relevance import Relevance
from server import checkpoint
from server.events import UpdateReceived
from server.harvest import device_submodel, harvest_merge, harvest_weights
from server.methods import server_method
from server.strategies import get_strategy
from tests.unit.methods.server_rig import LayoutModel, Rig

K = 5
LAYOUT = build(full_structure("mlp", (1, 4, 4), K)).layout
A, B = "classes=0+1,width=0.5", "classes=2+3+4,width=0.5"
HIST = {"a": (30, 10, 0, 0, 0), "b": (0, 0, 5, 20, 40)}


@pytest.fixture()
def rel_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    scores = {g: rng.random((n, K)).astype(np.float32) for g, n in LAYOUT.groups.items() if g != "classes"}
    path = tmp_path / "relevance.npz"
    Relevance(scores, 0).save(path)
    return path


def _rig(rel_file: Path, hist=HIST) -> Rig:
    params = {"relevance_file": str(rel_file), "relevance_every": 0}
    return Rig(get_strategy("fedavg", merge="per-element"), LayoutModel(LAYOUT), {"a": A, "b": B},
               method="chenqin", params=params, histograms=hist)


def test_disjoint_classes_get_different_submodels_with_their_rows(rel_file: Path) -> None:
    rig = _rig(rel_file)
    ia, ib = rig.task("a").indices, rig.task("b").indices
    assert ia is not None and ib is not None and not np.array_equal(ia, ib)
    out_b = LAYOUT["out.b"]
    for idx, rows in ((ia, {0, 1}), (ib, {2, 3, 4})):
        assert set(idx[(idx >= out_b.offset) & (idx < out_b.end)] - out_b.offset) == rows
    fc1_b = LAYOUT["fc1.b"]  # the filters differ, not only the rows: relevance picks them
    held_a = set(ia[(ia >= fc1_b.offset) & (ia < fc1_b.end)].tolist())
    held_b = set(ib[(ib >= fc1_b.offset) & (ib < fc1_b.end)].tolist())
    assert held_a != held_b and len(held_a) == len(held_b) == 64
    assert rig.task("a").assignment.extras == {"relevance_version": 0}


def test_the_engine_harvests_with_per_coordinate_weights(rel_file: Path) -> None:
    rig = _rig(rel_file)
    rng = np.random.default_rng(1)
    sent = {d: (rig.g0 + rng.normal(size=rig.g0.size)).astype(np.float32) for d in ("a", "b")}
    holders = []
    rel = Relevance.load(rel_file, LAYOUT)
    for d, classes in (("a", [0, 1]), ("b", [2, 3, 4])):
        dev = device_submodel(rel.scores, LAYOUT.groups, classes, 0.5, 0.4)
        idx = rig.task(d).indices
        holders.append((idx, sent[d][idx], harvest_weights(LAYOUT, dev, [HIST[d][c] for c in classes])))
        rig.update(d, sent[d], n_samples=sum(HIST[d]))
    assert rig.logs("aggregated")
    np.testing.assert_allclose(rig.engine.global_flat, harvest_merge(rig.g0, holders), rtol=1e-6, atol=1e-6)


def test_an_update_whose_indices_differ_from_the_assignment_is_refused(rel_file: Path) -> None:
    rig = _rig(rel_file)
    task = rig.task("a")
    assert task.indices is not None
    other = task.indices[1:]  # one coordinate short
    upd = Update(task.task_id, "a", task.base_version, 40, 0.0, 0.0, None, "weights")
    rig.actions += rig.engine.handle(UpdateReceived("a", upd, rig.g0[other], other))
    (log,) = rig.logs("update_rejected")
    assert f"update covers {other.size} coordinates that differ from the assignment of profile {A!r}" in log["reason"]


def test_a_class_the_device_holds_no_data_for_is_refused(rel_file: Path) -> None:
    rig = _rig(rel_file, hist={"a": (30, 0, 0, 0, 0), "b": HIST["b"]})
    rig.update("a", rig.g0, n_samples=30)
    (log,) = rig.logs("update_rejected")
    assert "holds no sample of class 1 of its subset [0, 1]" in log["reason"]
    assert np.array_equal(rig.engine.global_flat, rig.g0)


def test_a_class_out_of_range_is_refused(rel_file: Path) -> None:
    method = server_method("chenqin", {"relevance_file": str(rel_file)}, LayoutModel(LAYOUT))
    with pytest.raises(ConfigError, match="class 7 is out of range for a model of 5 classes"):
        method.assign("classes=0+7,width=0.5", 0)


def test_a_relevance_file_that_does_not_match_the_model_is_refused(rel_file: Path) -> None:
    other = build(full_structure("mlp", (1, 4, 4), K + 2)).layout
    with pytest.raises(ConfigError, match=r"group 'fc1' has scores of shape \(128, 5\), the model needs \(128, 7\)"):
        server_method("chenqin", {"relevance_file": str(rel_file)}, LayoutModel(other))


def test_relevance_derived_indices_survive_a_checkpoint(rel_file: Path, tmp_path: Path) -> None:
    rig = _rig(rel_file)
    sent = {t.device_id: t.indices for t in rig.engine.outstanding.values()}
    checkpoint.save(tmp_path, rig.engine)
    state = checkpoint._read_state(checkpoint.checkpoint_dir(tmp_path))
    assert state is not None and all("indices" in t for t in state["tasks"])
    params = {"relevance_file": str(rel_file), "relevance_every": 0}
    model = LayoutModel(LAYOUT)
    restored = checkpoint.load(tmp_path, model=model, clock=lambda: 0.0,
                               method=server_method("chenqin", params, model))
    for task in restored.outstanding.values():
        np.testing.assert_array_equal(task.indices, sent[task.device_id])


def test_relevance_is_rescored_after_every_k_merges(artifact_cache: Path, tmp_path: Path) -> None:
    full = full_structure("mlp", (1, 4, 4), K)
    proxy = tmp_path / "proxy.npz"
    rng = np.random.default_rng(2)
    np.savez(proxy, x=rng.normal(size=(20, 1, 4, 4)).astype(np.float32), y=np.arange(20) % K)
    model = SimpleNamespace(layout=LAYOUT, n_params=LAYOUT.total, proxy_path=proxy,
                            extra_dirs={"relevance": ensure_relevance_artifact(full, 8, artifact_cache)},
                            artifact_key=LayoutModel(LAYOUT).artifact_key)
    method = server_method("chenqin", {"relevance_every": 2}, model)
    g = build(full, seed=0).init
    method.on_global(0, g)
    assert method.relevance is not None and method.relevance.version == 0
    first = method.assign(A, 0)
    method.on_global(1, g + 0.1)
    assert method.relevance.version == 0  # not yet: every 2 merges
    method.on_global(2, (g * 1.5).astype(np.float32))
    assert method.relevance.version == 2
    again = method.assign(A, 2)
    assert again[0].extras == {"relevance_version": 2} and first[0].extras == {"relevance_version": 0}


def test_params_are_checked() -> None:
    with pytest.raises(ConfigError, match="q 0 must be a number in"):
        server_method("chenqin", {"q": 0}, LayoutModel(LAYOUT))
    with pytest.raises(ConfigError, match="has no key 'qq'"):
        server_method("chenqin", {"qq": 0.3}, LayoutModel(LAYOUT))


def test_dense_serves_every_class_and_a_subset_profile_without_classes_is_refused(rel_file: Path) -> None:
    method = server_method("chenqin", {"relevance_file": str(rel_file)}, LayoutModel(LAYOUT))
    assignment, indices = method.assign("dense", 0)
    assert indices is None and assignment.profile == "dense"  # the full model, every class row
    with pytest.raises(ConfigError, match=r"chenqin profile 'width=0\.5' names no classes"):
        method.assign("width=0.5", 0)
