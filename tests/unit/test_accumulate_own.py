"""The scatter kernel for updates whose index arrays are their own (Chen & Qin per-device
submodels, ZeroFL top-k uploads, Co-S²P masks; server/accumulate.py `_scatter_own`) against
float64 references: scipy's compiled kernel and the np.add.at fallback alike, partial sums of
GROUP, coordinate weights, empty sets, zero weights, and the refusals it relies on."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest

from runtime.errors import ConfigError, RoundError
from server import accumulate
from server import aggregate as agg
from server.accumulate import GROUP, coverage_sums
from server.aggregate import UpdateContribution as UC

EPS32 = float(np.finfo(np.float32).eps)
BOUND = GROUP + 1  # test_accumulate.py states it


@pytest.fixture(params=["csc", "numpy"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Both scatter kernels: scipy's (the default where scipy imports) and the fallback."""
    if request.param == "csc":
        pytest.importorskip("scipy.sparse._sparsetools")
        monkeypatch.setattr(accumulate, "scatter_add", accumulate._scatter_add_csc)
    else:
        monkeypatch.setattr(accumulate, "scatter_add", accumulate._scatter_add_numpy)
    yield request.param


def own_round(r: np.random.Generator, n: int, count: int, coord_weights: bool, index_type: type = np.int64) -> list[UC]:
    """`count` updates, each its own index array: sorted random sets of random density, some
    unsorted, some empty, some runs; every 3rd with coordinate weights when asked."""
    out = []
    for k in range(count):
        size = int(r.integers(0, n + 1)) if k % 7 else 0
        idx = r.choice(n, size, replace=False).astype(index_type)
        if k % 4:
            idx = np.sort(idx)
        if k % 5 == 1:
            start = int(r.integers(0, n // 2))
            idx = np.arange(start, start + n // 2, dtype=index_type)  # one contiguous run
        cw = r.uniform(0, 2, idx.size).astype(np.float32) if coord_weights and k % 3 == 0 else None
        out.append(UC(idx, (r.standard_normal(idx.size) * 10.0 ** r.uniform(-2, 2)).astype(np.float32),
                      float(r.uniform(0, 5)), cw))
    return out


def reference(n: int, cs: list[UC], absolute: bool = False) -> tuple[np.ndarray, np.ndarray]:
    num, den = np.zeros(n), np.zeros(n)
    for c in cs:
        assert c.indices is not None
        gamma = c.weight * (1.0 if c.coord_weights is None else c.coord_weights.astype(np.float64))
        v = c.values.astype(np.float64)
        num[c.indices] += gamma * (np.abs(v) if absolute else v)
        den[c.indices] += gamma * np.ones(c.indices.size)
    return num, den


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("coord_weights", [False, True])
@pytest.mark.parametrize("index_type", [np.int32, np.int64])  # check_indices' type, and an unnarrowed one
def test_own_sets_match_the_float64_reference_within_the_bound(kernel: str, seed: int, coord_weights: bool,
                                                                index_type: type) -> None:
    r = np.random.default_rng(300 + seed)
    n = int(r.integers(2, 500))
    cs = own_round(r, n, int(r.integers(1, 3 * GROUP + 2)), coord_weights, index_type)  # partial sums + a remainder
    num, den = reference(n, cs)
    mag, _ = reference(n, cs, absolute=True)
    agg.check_contributions(n, cs)
    got = coverage_sums(n, cs)
    assert got.den is not None
    assert np.all(np.abs(got.num - num) <= BOUND * EPS32 * mag + 1e-300)
    assert np.all(np.abs(got.den - den) <= BOUND * EPS32 * den + 1e-300)
    assert np.array_equal(coverage_sums(n, cs, counts=False).num, got.num)


def test_both_kernels_give_the_same_sums_and_exact_ones_for_exact_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("scipy.sparse._sparsetools")
    r = np.random.default_rng(5)
    n = 300
    cs = [UC(np.sort(r.choice(n, 120, replace=False)).astype(np.int64),
             r.integers(-8, 8, 120).astype(np.float32), float(r.integers(0, 4))) for _ in range(2 * GROUP + 1)]
    num, den = reference(n, cs)  # small integers: every float32 partial is exact
    for name in ("_scatter_add_csc", "_scatter_add_numpy"):
        monkeypatch.setattr(accumulate, "scatter_add", getattr(accumulate, name))
        got = coverage_sums(n, cs)
        assert got.den is not None
        np.testing.assert_array_equal(got.num, num)
        np.testing.assert_array_equal(got.den, den)


def test_the_default_kernel_is_scipys_where_scipy_imports() -> None:
    pytest.importorskip("scipy.sparse._sparsetools")
    assert accumulate.scatter_add is accumulate._scatter_add_csc


def test_empty_sets_and_zero_weights_leave_the_global_model(kernel: str) -> None:
    n = 40
    r = np.random.default_rng(9)
    g = r.standard_normal(n).astype(np.float32)
    empty = UC(np.zeros(0, np.int64), np.zeros(0, np.float32), 3.0)
    zero = UC(np.arange(0, n, 2, dtype=np.int64), r.standard_normal(n // 2).astype(np.float32), 0.0)
    np.testing.assert_array_equal(agg.per_element_average(g, [empty, zero]), g)
    np.testing.assert_array_equal(agg.per_element_delta(g, [empty, zero]), g)
    np.testing.assert_array_equal(agg.apply_deltas(g, [empty, zero]), g)
    one = UC(np.array([5, 9], np.int64), np.array([1.5, -2.0], np.float32), 2.0)
    out = agg.per_element_average(g, [empty, zero, one])
    expected = g.copy()
    expected[[5, 9]] = [1.5, -2.0]  # the only positive weight covering them
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(("indices", "error"), [
    ([4, 1, 4], "contribution 1: 1 repeated indices"), ([1, 2, 2, 3], "contribution 1: 1 repeated indices"),
    ([3, 40], r"contribution 1: indices span \[3, 40\], outside"), ([-2, 3], "contribution 1: indices span"),
])
def test_bad_own_sets_are_refused_before_the_kernel(kernel: str, indices: list[int], error: str) -> None:
    """The compiled kernel checks no bounds and adds a repeated index twice: the merge refuses
    both first, naming the contribution, and the global model is untouched."""
    n = 40
    g = np.ones(n, np.float32)
    good = UC(np.arange(10, dtype=np.int64), np.ones(10, np.float32), 1.0)
    bad = UC(np.array(indices, np.int64), np.ones(len(indices), np.float32), 1.0)
    for merge in (agg.per_element_average, agg.per_element_delta, agg.apply_deltas):
        with pytest.raises(RoundError, match=error):
            merge(g, [good, bad])
    np.testing.assert_array_equal(g, np.ones(n, np.float32))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_own_set_value_is_named_after_partial_sums(kernel: str, bad: float) -> None:
    n = 50
    r = np.random.default_rng(11)
    g = r.standard_normal(n).astype(np.float32)
    cs = own_round(r, n, GROUP + 4, coord_weights=True)
    victim = GROUP + 2  # in the second partial sum, weight 0
    idx = np.array([3, 17, 30], np.int64)
    poisoned = np.array([0.5, bad, 1.0], np.float32)
    cs[victim] = UC(idx, poisoned, 0.0)
    for merge in (agg.per_element_average, agg.per_element_delta, agg.apply_deltas):
        with pytest.raises(RoundError, match=f"contribution {victim}: 1 non-finite values"):
            merge(g, [UC(c.indices, c.values, c.weight) for c in cs] if merge is agg.apply_deltas else cs)


def test_a_sparse_uploads_indices_are_checked_once_and_the_senders_array_is_left_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission checks an upload's indices and keeps a read-only copy, so the merge does not
    check them again (it was twice: ~as costly as the scatter); the sender's array stays writable."""
    from runtime.methods import spec
    from runtime.protocol import Update
    from server.events import UpdateReceived
    from server.strategies import get_strategy
    from tests.unit.methods.conftest import mlp_layout
    from tests.unit.methods.server_rig import LayoutModel, Rig

    layout = mlp_layout(1.0)
    rig = Rig(get_strategy("fedavg"), LayoutModel(layout), {"a": "dense"}, method="zerofl",
              params=spec("zerofl").params({"upload": "top-k-diff"}))
    calls: list[int] = []
    real = agg._check_indices

    def counted(indices: np.ndarray, n_params: int, what: str) -> np.ndarray:
        calls.append(int(np.asarray(indices).size))
        return real(indices, n_params, what)

    monkeypatch.setattr(agg, "_check_indices", counted)
    merged: list[np.dtype] = []
    real_sums = agg.coverage_sums

    def recorded(n_params: int, cs: list[UC], counts: bool = True) -> accumulate.Coverage:
        merged.extend(c.indices.dtype for c in cs if c.indices is not None)
        return real_sums(n_params, cs, counts)

    monkeypatch.setattr(agg, "coverage_sums", recorded)
    sent = np.arange(0, layout.total, 7, dtype=np.int64)
    delta = np.full(sent.size, 0.5, np.float32)
    upd = Update(rig.task("a").task_id, "a", 0, 5, 1.0, 1.0, None, "delta")
    rig.actions += rig.engine.handle(UpdateReceived("a", upd, delta, sent))
    assert rig.engine.version == 1  # merged
    assert calls == [sent.size]  # admission only
    assert merged == [np.int32]  # the sender's int64, narrowed once by admission
    assert sent.flags.writeable
    expected = rig.g0.copy()
    expected[sent] += 0.5
    np.testing.assert_allclose(rig.engine.global_flat, expected, atol=1e-6)


def test_the_engines_assignments_are_frozen_int32() -> None:
    from server.engine import Engine
    from server.policies import TableModel
    from server.strategies import get_strategy

    n = 40
    table = {"width=0.5": np.arange(0, n, 2, dtype=np.int64), "width=0.25": np.array([1, n], dtype=np.int64)}
    engine = Engine(get_strategy("fedavg", merge="per-element"), TableModel(n, table), np.zeros(n, np.float32),
                    clock=lambda: 0.0)
    _, idx = engine.assignment_for("width=0.5", 0)
    assert idx is not None and idx.dtype == np.int32 and not idx.flags.writeable
    assert idx.tolist() == table["width=0.5"].tolist()
    with pytest.raises(ConfigError, match="outside the model's"):
        engine.assignment_for("width=0.25", 0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1.0])
@pytest.mark.parametrize("merge", [agg.per_element_average, agg.per_element_delta])
def test_bad_coordinate_weights_are_refused_and_the_global_model_kept(merge: object, bad: float) -> None:
    g = np.arange(10, dtype=np.float32)
    before = g.copy()
    cw = np.array([1.0, bad, 2.0], np.float32)
    cs = [UC(np.array([1, 4, 7], np.int32), np.ones(3, np.float32), 1.0, cw)]
    with pytest.raises(RoundError, match=r"^contribution 0: coordinate weights must be finite and >= 0$"):
        merge(g, cs)  # type: ignore[operator]
    assert np.array_equal(g, before)


@pytest.mark.parametrize("weights", ["whole", "fractional", "whole_past_2_24"])
def test_counts_are_exact_for_whole_weights_and_within_the_bound_otherwise(kernel: str, weights: str) -> None:
    """Whole-number weights (sample counts) summing below 2**24 give exact float32 counts over the
    whole round; otherwise the counts are partial sums of GROUP, within the bound."""
    r = np.random.default_rng(11)
    n = 300
    cs = own_round(r, n, 3 * GROUP + 5, coord_weights=False, index_type=np.int32)
    scale = {"whole": 1.0, "fractional": 1.0, "whole_past_2_24": 2.0**20}[weights]
    cs = [UC(c.indices, c.values, float(r.integers(0, 100)) * scale + (0.37 if weights == "fractional" else 0.0))
          for c in cs]
    assert accumulate._exact_counts(cs) == (weights == "whole")
    _, den = reference(n, cs)
    got = coverage_sums(n, cs).den
    assert got is not None
    if weights == "whole":
        assert np.array_equal(got, den)
    else:
        assert np.all(np.abs(got - den) <= BOUND * EPS32 * den)
