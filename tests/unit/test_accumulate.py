"""The accumulation kernels (server/accumulate.py) against float64 numpy references, and the
validation they rely on (indices checked once, finiteness found on the result)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.errors import RoundError
from server import aggregate as agg
from server import weighting
from server.accumulate import GROUP, coverage_sums, weighted_sum_into
from server.aggregate import UpdateContribution as UC

EPS32 = float(np.finfo(np.float32).eps)
# The stated tolerance: float32 products and partial sums of GROUP updates are within
# (GROUP + 1) float32 epsilons of Σ|w_i v_i| of the float64 sum, per coordinate (a worst-case
# bound; the benchmark's round measures < 2).
BOUND = GROUP + 1


def ref_sum(values: list[np.ndarray], weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(Σ w v, Σ |w v|) in float64, update by update."""
    total = np.zeros(values[0].size)
    mag = np.zeros(values[0].size)
    for v, w in zip(values, weights, strict=True):
        total += w * v.astype(np.float64)
        mag += np.abs(w * v.astype(np.float64))
    return total, mag


@pytest.mark.parametrize("seed", range(6))
def test_weighted_sum_matches_float64_within_the_stated_bound(seed: int) -> None:
    r = np.random.default_rng(seed)
    size = int(r.integers(1, 5000))
    count = int(r.integers(1, 3 * GROUP + 3))  # partial sums of GROUP, and a remainder
    values = [(r.standard_normal(size) * 10.0 ** r.uniform(-3, 3)).astype(np.float32) for _ in range(count)]
    weights = [float(r.uniform(0, 100)) for _ in range(count)]
    out = np.zeros(size)
    weighted_sum_into(out, values, weights)
    total, mag = ref_sum(values, weights)
    assert np.all(np.abs(out - total) <= BOUND * EPS32 * mag + 1e-300)


def test_weighted_sum_adds_to_what_is_there_and_is_exact_for_exact_inputs() -> None:
    values = [np.array([1.0, -2.0, 0.5], np.float32)] * (2 * GROUP + 1)
    out = np.array([10.0, 0.0, -1.0])
    weighted_sum_into(out, values, [0.25] * len(values))
    n = 2 * GROUP + 1
    np.testing.assert_array_equal(out, [10.0 + 0.25 * n, -0.5 * n, -1.0 + 0.125 * n])


def ref_coverage(n: int, cs: list[UC]) -> tuple[np.ndarray, np.ndarray]:
    num, den = np.zeros(n), np.zeros(n)
    for c in cs:
        gamma = c.weight * (1.0 if c.coord_weights is None else c.coord_weights.astype(np.float64))
        idx = np.arange(n) if c.indices is None else c.indices
        num[idx] += gamma * c.values.astype(np.float64)
        den[idx] += gamma * np.ones(idx.size)
    return num, den


def coverage_round(r: np.random.Generator, n: int) -> list[UC]:
    """Dense updates, tiers shared by several updates (not adjacent), an update of its own,
    an equal-content copy of a tier (a different object), and per-coordinate weights."""
    tiers = [np.sort(r.choice(n, int(r.integers(1, n)), replace=False)) for _ in range(2)]
    own = r.permutation(n)[: int(r.integers(1, n))]  # unsorted
    picks: list[np.ndarray | None] = [None, tiers[0], tiers[1], tiers[0], own, tiers[0].copy(), None, tiers[1]]
    out = []
    for k in range(int(r.integers(2, 3 * GROUP))):
        idx = picks[k % len(picks)]
        size = n if idx is None else idx.size
        cw = r.uniform(0, 2, size).astype(np.float32) if k % 5 == 4 else None
        out.append(UC(idx, r.standard_normal(size).astype(np.float32), float(r.uniform(0, 3)), cw))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_coverage_sums_match_the_reference(seed: int) -> None:
    r = np.random.default_rng(100 + seed)
    n = int(r.integers(2, 400))
    cs = coverage_round(r, n)
    num, den = ref_coverage(n, cs)
    mag, _ = ref_coverage(n, [UC(c.indices, np.abs(c.values), c.weight,
                                 None if c.coord_weights is None else c.coord_weights) for c in cs])
    got = coverage_sums(n, cs)
    assert got.den is not None
    # The counts of own-set updates are float32 partial sums too: Σ γ_i of positive terms, so
    # within the same bound relative to itself (they were exact float64 before the scatter kernel).
    assert np.all(np.abs(got.den - den) <= BOUND * EPS32 * den + 1e-300)
    assert np.all(np.abs(got.num - num) <= BOUND * EPS32 * mag + 1e-300)
    assert coverage_sums(n, cs, counts=False).den is None


@pytest.mark.parametrize("seed", range(4))
def test_merges_with_shared_tiers_and_stale_weights_match_the_reference(seed: int) -> None:
    """Per-element and delta merges over a round of shared tiers, own index sets and staleness
    weights (FedBuff's s(τ) = 1/sqrt(1 + τ)) agree with float64 formulas."""
    r = np.random.default_rng(200 + seed)
    n = int(r.integers(2, 300))
    g = r.standard_normal(n).astype(np.float32)
    cs = [UC(c.indices, c.values, weighting.staleness_sqrt(int(r.integers(0, 9)))) for c in coverage_round(r, n)]
    num, den = ref_coverage(n, cs)
    covered = den > 0
    expected = g.astype(np.float64)
    expected[covered] += 0.7 * num[covered] / den[covered]
    np.testing.assert_allclose(agg.per_element_delta(g, cs, 0.7), expected, atol=2e-6)
    k = len(cs)
    np.testing.assert_allclose(agg.fedbuff_apply(g, cs, 0.8), g + 0.8 / k * num, atol=2e-6)


def test_a_frozen_index_array_is_checked_once_and_a_writable_one_every_time() -> None:
    n = 10
    frozen = np.array([1, 4, 7], np.int64)
    frozen.flags.writeable = False
    narrowed = agg.check_indices(frozen, n, "t")
    assert narrowed.dtype == np.int32 and narrowed.tolist() == [1, 4, 7]  # the model's index type
    assert id(frozen) in agg._CHECKED
    assert agg.check_indices(frozen, n, "t") is frozen  # remembered: returned at once, as it is
    with pytest.raises(RoundError, match="outside"):
        agg.check_indices(frozen, 5, "t")  # checked for n = 10 only
    writable = np.array([1, 4, 7], np.int64)
    agg.check_indices(writable, n, "t")
    assert id(writable) not in agg._CHECKED
    writable[2] = 12
    with pytest.raises(RoundError, match=r"span \[1, 12\]"):
        agg.check_indices(writable, n, "t")
    base = np.array([1, 4, 7], np.int64)
    view = base[:]
    view.flags.writeable = False  # a read-only view of a writable array can still change
    agg.check_indices(view, n, "t")
    assert id(view) not in agg._CHECKED
    key = id(frozen)
    del frozen
    assert key not in agg._CHECKED  # the entry leaves with its array


@pytest.mark.parametrize(("indices", "error"), [
    ([3, 1, 2], None), ([5], None), ([2, 2], "1 repeated"), ([4, 1, 4], "1 repeated"),
    ([0, 10], "outside"), ([-1, 3], "outside"), ([3, -1], "outside"),
])
def test_index_checks_sorted_and_unsorted(indices: list[int], error: str | None) -> None:
    idx = np.array(indices, np.int64)
    if error is None:
        assert agg.check_indices(idx, 10, "t").tolist() == indices
    else:
        with pytest.raises(RoundError, match=error):
            agg.check_indices(idx, 10, "t")


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32, np.uint64])
def test_indices_come_back_int32_up_to_2_31_parameters_and_int64_past_it(dtype: type) -> None:
    idx = np.array([0, 5, 9], dtype)
    got = agg.check_indices(idx, 10, "t")
    assert got.dtype == np.int32 and got.tolist() == [0, 5, 9]
    assert (got is idx) == (dtype is np.int32)  # no copy when it is already the model's type
    huge = 2**31 + 7  # sorted indices are checked without a scratch buffer of n_params
    wide = agg.check_indices(np.array([3, 2**31 + 5], np.int64), huge, "t")
    assert wide.dtype == np.int64 and wide.tolist() == [3, 2**31 + 5]
    assert agg.check_indices(np.array([3, 4], np.int32), huge, "t").dtype == np.int64


@pytest.mark.parametrize("indices", [[1, 2**32 + 3], [2**32 + 3, 1], [1, 2**31], [-(2**32) + 1, 2], [2, 1 - 2**32]])
def test_indices_that_would_wrap_into_range_as_int32_are_refused(indices: list[int]) -> None:
    """The range is checked on the sender's integers before they are narrowed: 2**32 + 3 must not
    become index 3."""
    for check in (agg.check_indices, agg.frozen_indices):
        with pytest.raises(RoundError, match="outside the model's"):
            check(np.array(indices, np.int64), 10, "t")


def test_frozen_indices_are_a_private_read_only_checked_copy() -> None:
    for dtype in (np.int32, np.int64):
        sent = np.array([7, 2, 4], dtype)
        got = agg.frozen_indices(sent, 10, "upload")
        assert got.dtype == np.int32 and got.tolist() == [7, 2, 4] and not got.flags.writeable
        assert not np.may_share_memory(got, sent) and sent.flags.writeable
        assert id(got) in agg._CHECKED and agg.check_indices(got, 10, "t") is got
    with pytest.raises(RoundError, match="1 repeated"):
        agg.frozen_indices(np.array([4, 1, 4], np.int32), 10, "upload")


@pytest.mark.parametrize("merge", ["weighted_average", "per_element_average", "per_element_delta",
                                   "apply_deltas", "masked_delta_merge"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_values_are_named_even_under_weight_zero(merge: str, bad: float) -> None:
    """Finiteness is found on the result: the offender is still named, in a shared tier, with
    weight 0 (whose coordinates the per-element merges leave at W), and W is untouched."""
    n = 30
    r = np.random.default_rng(7)
    g = r.standard_normal(n).astype(np.float32)
    before = g.copy()
    tier = np.arange(0, n, 2, dtype=np.int64)
    dense = merge == "weighted_average"
    cs = [UC(None if dense else tier, r.standard_normal(n if dense else tier.size).astype(np.float32), 1.0)
          for _ in range(GROUP + 3)]
    poisoned = cs[GROUP + 1].values.copy()
    poisoned[3] = bad
    cs[GROUP + 1] = UC(cs[GROUP + 1].indices, poisoned, 0.0)
    with pytest.raises(RoundError, match=f"contribution {GROUP + 1}: 1 non-finite values"):
        getattr(agg, merge)(g, cs)
    np.testing.assert_array_equal(g, before)


def test_overflow_of_finite_updates_is_refused_with_one_line() -> None:
    """Finite updates whose sum leaves float32 are refused, never published as inf. The float32
    partial sums refuse a little earlier than a float64 sum would: two updates at 3e38 averaged
    per element (3e38 in float64) overflow their partial sum; no model holds such values."""
    big = np.full(4, 3e38, np.float32)
    with pytest.raises(RoundError, match="delta merge produced 4 non-finite values"):
        agg.apply_deltas(big, [UC(None, big, 1.0)])
    with pytest.raises(RoundError, match="per-element delta merge: weighted sums overflowed"):
        agg.per_element_delta(np.zeros(4, np.float32), [UC(None, big, 1.0), UC(None, big, 1.0)])
    # A weighted average is a convex combination: normalised weights cannot overflow.
    np.testing.assert_allclose(agg.weighted_average(np.zeros(4, np.float32), [UC(None, big, 1e30),
                                                                              UC(None, big, 1.0)]), big)


def test_pooled_buffers_are_sized_by_the_model_not_the_round() -> None:
    """Merges reuse the same buffers: a round of many updates allocates nothing per update."""
    from server import accumulate

    n = 1000
    r = np.random.default_rng(3)
    g = r.standard_normal(n).astype(np.float32)
    tier = np.arange(0, n, 3, dtype=np.int64)

    def round_of(k: int) -> list[UC]:
        return [UC(tier if i % 2 else None, r.standard_normal(tier.size if i % 2 else n).astype(np.float32), 1.0)
                for i in range(k)]

    accumulate.release()
    agg.per_element_delta(g, round_of(4))
    bufs = accumulate._POOL.__dict__["bufs"]
    before = {role: (id(b), b.size) for role, b in bufs.items()}
    agg.per_element_delta(g, round_of(5 * GROUP))
    agg.apply_deltas(g, round_of(3))
    assert {role: (id(b), b.size) for role, b in bufs.items() if role in before} == before
    assert max(b.size for b in bufs.values()) <= n
