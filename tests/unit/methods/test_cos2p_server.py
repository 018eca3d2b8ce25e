"""Co-S²P's server half on a real ServerModel (artifacts built here): the importance/staleness
weighting and the merge of sparse masked deltas equal an independent numpy reference on random
inputs, across a stale update; bad indices are refused with one line naming the reason, and
the global model is untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.builder import build as build_model
from models.methods.cos2p import build
from models.structure import EXIT_BLOCKS, Structure, full_structure
from runtime.methods import spec
from runtime.methods.cos2p import mask_indices, random_mask
from runtime.protocol import Update
from server.events import NewGlobal, UpdateReceived
from server.model import ServerModel
from server.strategies import get_strategy
from tests.unit.methods.server_rig import Rig

SHAPE, CLASSES = (1, 12, 12), 6
TIERS = {"a": "dense", "b": "keep=0.5,depth=0.5", "c": "keep=0.25,depth=0.5"}
PARAMS = spec("cos2p").params()


@pytest.fixture(scope="module")
def model(artifact_cache, tmp_path_factory) -> ServerModel:
    sets = build(PARAMS, "cnn", SHAPE, CLASSES, list(TIERS.values()), cache_dir=artifact_cache)
    run = tmp_path_factory.mktemp("cos2p_run")
    full = full_structure("cnn", SHAPE, CLASSES)
    np.save(run / "init.npy", build_model(Structure("cnn", SHAPE, full.channels, EXIT_BLOCKS["cnn"])).init)
    auxiliary = sorted({a for t in TIERS.values() for a in spec("cos2p").auxiliary_artifacts(t, PARAMS)})
    (run / "artifacts.json").write_text(json.dumps({
        "model": "cnn", "init": "init.npy", "global": str(sets[spec("cos2p").global_profile(PARAMS)].directory),
        "profiles": {k: str(v.directory) for k, v in sets.items()}, "auxiliary": auxiliary}))
    return ServerModel(Path(run / "artifacts.json"))


def rig(model: ServerModel) -> Rig:
    strategy = get_strategy("semi-async", k=2, max_staleness=10, weight="cos2p", merge="masked-delta")
    return Rig(strategy, model, TIERS, method="cos2p", params=PARAMS)


def masked_update(model: ServerModel, r: Rig, device: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random unit mask of the device's tier and random delta values at its coordinates."""
    task = r.task(device)
    keep = task.assignment.extras["keep"]
    n = model.n_params if task.indices is None else task.indices.size
    cut = [p for p in model.layout if p.end <= n]
    groups = {p.axes[0].group for p in cut if p.kind == "bias" and p.axes[0].group != "classes"}
    mask = {g: random_mask(model.layout.groups[g], keep, rng) for g in groups}
    from runtime.layout import ParamLayout
    idx = mask_indices(ParamLayout(tuple(cut), model.layout.groups), mask)
    return idx, rng.normal(0.0, 0.01, idx.size).astype(np.float32)


def send(r: Rig, device: str, idx: np.ndarray, values: np.ndarray, kind: str = "delta") -> None:
    task = r.task(device)
    upd = Update(task.task_id, device, task.base_version, 10, 1.0, 10.0, None, kind)
    r.actions += r.engine.handle(UpdateReceived(device, upd, values, idx))


def reference_merge(g: np.ndarray, ups: list[tuple[np.ndarray, np.ndarray, float, float]],
                    cap: float = 3.0) -> np.ndarray:
    """methods.md §1.3 written out: imp = Σ|Δ|/rate, clipped at cap × the round's lower median of
    imp/rate, times rate (the server's guard against a client buying weight with a big delta; not
    in the paper), stale = drift L1, γ̃ = imp/(stale+1), γ = γ̃/Σγ̃, W + Σ γ_i scatter(Δ_i)."""
    imp = np.array([np.abs(v.astype(np.float64)).sum() / rate for _, v, rate, _ in ups])
    rates = np.array([rate for *_, rate, _ in ups])
    per_rate = np.sort(imp / rates)[(len(ups) - 1) // 2]
    imp = np.minimum(imp, cap * per_rate * rates)
    raw = imp / np.array([drift + 1.0 for *_, drift in ups])
    gamma = raw / raw.sum()
    out = g.astype(np.float64).copy()
    for (idx, v, _, _), w in zip(ups, gamma, strict=False):
        np.add.at(out, idx, w * v.astype(np.float64))
    return out.astype(np.float32)


def test_weighting_and_merge_match_numpy_across_a_stale_update(model: ServerModel) -> None:
    rng = np.random.default_rng(7)
    r = rig(model)
    g0 = r.engine.global_flat.copy()
    ua, ub, uc = (masked_update(model, r, d, rng) for d in "abc")
    send(r, "a", *ua)
    send(r, "b", *ub)
    assert [a for a in r.actions if isinstance(a, NewGlobal)][-1].version == 1
    g1 = r.engine.global_flat.copy()
    np.testing.assert_allclose(g1, reference_merge(g0, [(*ua, 1.0, 0.0), (*ub, 0.5, 0.0)]), atol=1e-7)
    drift = float(np.abs(g1.astype(np.float64) - g0.astype(np.float64)).sum())
    send(r, "c", *uc)  # base version 0: stale by one version, drift ‖W1 − W0‖₁
    ua2 = masked_update(model, r, "a", rng)
    send(r, "a", *ua2)
    g2 = r.engine.global_flat
    np.testing.assert_allclose(g2, reference_merge(g1, [(*uc, 0.25, drift), (*ua2, 1.0, 0.0)]), atol=1e-7)
    # Exit heads are merged too: exit1 moved (a holds it at full depth, b and c as their last exit).
    exit1 = model.layout["exit1.W"]
    assert np.abs(g2[exit1.offset:exit1.end] - g0[exit1.offset:exit1.end]).sum() > 0


def _rejected(r: Rig) -> list[str]:
    return [str(e["reason"]) for e in r.logs("update_rejected")]


@pytest.mark.parametrize(("case", "reason"), [
    ("past_depth", "lies past its depth"),
    ("wrong_size", "keeps 32 units, keep 0.5 needs 16"),
    ("not_a_mask", "are not the coordinates of a unit mask"),
    ("dense", "mask of group 'conv1' keeps 32 units, keep 0.5 needs 16"),
    ("weights", "cos2p takes a masked delta, got kind 'weights'"),
])
def test_bad_indices_are_rejected_with_the_reason(model: ServerModel, case: str, reason: str) -> None:
    rng = np.random.default_rng(1)
    r = rig(model)
    g0 = r.engine.global_flat.copy()
    idx, values = masked_update(model, r, "b", rng)
    task = r.task("b")
    if case == "past_depth":
        idx = np.append(idx, task.indices.size + 5)
    elif case == "wrong_size":
        idx = np.arange(task.indices.size, dtype=np.int64)
    elif case == "not_a_mask":
        idx = idx[1:]
    values = rng.normal(size=idx.size).astype(np.float32)
    if case == "dense":
        send(r, "b", None, rng.normal(size=task.indices.size).astype(np.float32))
    else:
        send(r, "b", idx, values, "weights" if case == "weights" else "delta")
    reasons = _rejected(r)
    assert len(reasons) == 1 and reason in reasons[0] and "\n" not in reasons[0], reasons
    np.testing.assert_array_equal(r.engine.global_flat, g0)


def test_an_update_off_the_stored_mask_is_rejected(model: ServerModel) -> None:
    rng = np.random.default_rng(2)
    params = spec("cos2p").params({"mask_rounds": 1})
    strategy = get_strategy("semi-async", k=1, max_staleness=10, weight="cos2p", merge="masked-delta")
    r = Rig(strategy, model, {"b": TIERS["b"]}, method="cos2p", params=params)
    send(r, "b", *masked_update(model, r, "b", rng))  # round 0: its mask, now frozen
    g1 = r.engine.global_flat.copy()
    send(r, "b", *masked_update(model, r, "b", rng))  # round 1: another random mask
    reasons = _rejected(r)
    assert len(reasons) == 1 and "indices do not match the device's stored mask" in reasons[0]
    np.testing.assert_array_equal(r.engine.global_flat, g1)


def test_the_oom_fallback_lowers_keep_or_depth(model: ServerModel) -> None:
    server = rig(model).method
    offered = ("dense", "keep=0.5,depth=0.5", "keep=0.5", "keep=0.25,depth=0.5", "bogus=1")
    assert server.smaller("keep=0.5", offered) == ["keep=0.5,depth=0.5", "keep=0.25,depth=0.5"]
