"""Chen & Qin's sub-model selection and harvest (server/harvest.py) against independent numpy."""

from __future__ import annotations

import numpy as np
import pytest

from models.builder import build
from models.structure import full_structure
from runtime.errors import ConfigError
from runtime.submodel import Submodel
from server.harvest import device_submodel, harvest_merge, harvest_weights, select_channels, top_m

K = 6


def _relevance(layout, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {g: rng.random((n, K)).astype(np.float32) for g, n in layout.groups.items() if g != "classes"}


@pytest.fixture(scope="module")
def layout():
    return build(full_structure("lenet", (1, 8, 8), K)).layout


def test_top_m_picks_the_highest_per_class_column() -> None:
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.7], [0.0, 0.1]], dtype=np.float32)
    np.testing.assert_array_equal(top_m(scores, 2), [[False, True], [True, False], [True, True], [False, False]])


def test_union_within_budget_is_filled_with_the_most_relevant_others() -> None:
    scores = np.zeros((10, 3), dtype=np.float32)
    scores[[0, 1], 0] = [1.0, 0.9]  # class 0's top-2 (q = 0.2 of 10 filters)
    scores[[2, 3], 1] = [1.0, 0.9]  # class 1's top-2
    scores[7, 0] = 0.5  # the next most relevant to class 0
    scores[[4, 5], 2] = 1.0  # class 2 is not the device's
    choice = select_channels(scores, [0, 1], capacity=5, q=0.2)
    np.testing.assert_array_equal(choice.channels, [0, 1, 2, 3, 7])
    assert choice.threshold == 2
    np.testing.assert_array_equal(choice.serves[:, 0], [True, True, False, False, False])  # 7 is filler


def test_over_budget_raises_the_threshold() -> None:
    scores = np.zeros((10, 2), dtype=np.float32)
    scores[:, 0] = np.linspace(1, 0.1, 10)  # class 0 prefers 0, 1, 2, ...
    scores[:, 1] = np.linspace(0.1, 1, 10)  # class 1 prefers 9, 8, 7, ...
    choice = select_channels(scores, [0, 1], capacity=4, q=0.4)  # union of top-4s is 8 > 4
    assert choice.threshold == 2
    np.testing.assert_array_equal(choice.channels, [0, 1, 8, 9])


def test_disjoint_classes_get_different_submodels_each_with_its_classifier_rows(layout) -> None:
    rel = _relevance(layout)
    a = device_submodel(rel, layout.groups, [0, 1, 2], width=0.5, q=0.4)
    b = device_submodel(rel, layout.groups, [3, 4, 5], width=0.5, q=0.4)
    assert any(not np.array_equal(a.index_map[g], b.index_map[g]) for g in ("conv1", "conv2", "fc1", "fc2"))
    np.testing.assert_array_equal(a.index_map["classes"], [0, 1, 2])
    np.testing.assert_array_equal(b.index_map["classes"], [3, 4, 5])
    for dev, rows in ((a, [0, 1, 2]), (b, [3, 4, 5])):
        sub = Submodel.of(layout, dev.index_map)
        out_w = layout.params[[p.name for p in layout.params].index("out.W")]
        held = set(sub.indices.tolist())
        width = out_w.shape[1]
        for r in rows:  # the classifier rows of its classes, at the input features it holds
            assert {out_w.offset + r * width + j for j in range(width)} & held
        for r in set(range(K)) - set(rows):
            assert not {out_w.offset + r * width + j for j in range(width)} & held
        for g in ("conv1", "conv2", "fc1", "fc2"):  # the budget: half of every layer
            assert len(dev.index_map[g]) == -(-layout.groups[g] // 2)


def test_class_out_of_range_is_one_line(layout) -> None:
    with pytest.raises(ConfigError, match="class 7 is out of range for a model of 6 classes"):
        device_submodel(_relevance(layout), layout.groups, [1, 7], width=0.5, q=0.4)


def test_harvest_merge_matches_a_per_coordinate_reference(layout) -> None:
    """Three devices, overlapping sub-models; α per coordinate = its samples of the classes the
    coordinate's filter (or classifier row) serves; the reference loops over coordinates."""
    rng = np.random.default_rng(5)
    rel = _relevance(layout, seed=1)
    g = rng.normal(size=layout.total).astype(np.float32)
    devices = [([0, 1], [30, 10]), ([1, 2, 3], [5, 20, 40]), ([4], [7])]  # class 5: no owner
    holders, refs = [], []
    for classes, counts in devices:
        # width 1: no budget squeeze, so each device's threshold is ⌈q·C⌉ and the held filters
        # that serve none of its classes (filler) must get α = 0
        dev = device_submodel(rel, layout.groups, classes, width=1.0, q=0.4)
        sub = Submodel.of(layout, dev.index_map)
        alpha = harvest_weights(layout, dev, counts)
        values = rng.normal(size=sub.indices.size).astype(np.float32)
        holders.append((sub.indices, values, alpha))
        # Independent α: per global coordinate, from the parameter's first axis.
        ref_alpha = {}
        for p in layout.params:
            group = p.axes[0].group
            if group != "classes":
                m = int(np.ceil(0.4 * layout.groups[group] - 1e-9))
                ranks = {c: set(np.argsort(-rel[group][:, c], kind="stable")[:m].tolist()) for c in classes}
            per_row = int(np.prod(p.shape[1:]))
            for flat in range(p.offset, p.end):
                row = (flat - p.offset) // per_row
                if group == "classes":
                    a = counts[classes.index(row)] if row in classes else None
                else:
                    held = list(dev.index_map[group])
                    if row not in held:
                        a = None
                    else:
                        a = sum(n for c, n in zip(classes, counts, strict=True) if row in ranks[c])
                ref_alpha[flat] = a
        refs.append((dict(zip(sub.indices.tolist(), values.tolist(), strict=True)), ref_alpha))
        for flat, a in zip(sub.indices.tolist(), alpha.tolist(), strict=True):
            assert ref_alpha[flat] is not None and a == pytest.approx(ref_alpha[flat])
    merged = harvest_merge(g, holders)
    want = g.astype(np.float64).copy()
    for j in range(layout.total):
        num = den = 0.0
        for values, alpha in refs:
            if j in values:
                num += alpha[j] * values[j]
                den += alpha[j]
        if den > 0:
            want[j] = num / den
    np.testing.assert_allclose(merged, want.astype(np.float32), rtol=1e-6, atol=1e-6)
    held_by_none = np.ones(layout.total, dtype=bool)
    for idx, _, _ in holders:
        held_by_none[idx] = False
    assert held_by_none.any() and np.array_equal(merged[held_by_none], g[held_by_none])  # unheld keep their value
    zero = np.ones(layout.total, dtype=bool)  # held, but by devices whose classes it does not serve
    for idx, _, alpha in holders:
        zero[idx[alpha > 0]] = False
    zero &= ~held_by_none
    assert zero.any() and np.array_equal(merged[zero], g[zero])
    out_b = layout.params[[p.name for p in layout.params].index("out.b")].offset
    assert merged[out_b + 5] == g[out_b + 5]  # class 5's row: no owner
    assert merged[out_b + 0] == pytest.approx(holders[0][1][holders[0][0].tolist().index(out_b + 0)])
