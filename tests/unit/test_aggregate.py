"""Aggregation math against straightforward python-loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.errors import RoundError
from server import aggregate as agg
from server import weighting
from server.aggregate import UpdateContribution as UC

N = 57
TOL = 1e-6


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def rand(r: np.random.Generator, n: int = N) -> np.ndarray:
    return r.normal(size=n).astype(np.float32)


def subset(r: np.random.Generator, n: int = N) -> np.ndarray:
    k = int(r.integers(1, n))
    return np.sort(r.choice(n, size=k, replace=False)).astype(np.int64)


def mixed_contributions(r: np.random.Generator, count: int = 5) -> list[UC]:
    out = []
    for i in range(count):
        idx = None if i == 0 else subset(r)
        size = N if idx is None else idx.size
        out.append(UC(idx, rand(r, size), float(r.uniform(0.1, 3.0))))
    return out


def covered(c: UC, j: int) -> tuple[bool, float]:
    """Whether c covers coordinate j, and its value there (reference, by python search)."""
    if c.indices is None:
        return True, float(c.values[j])
    where = [k for k, ix in enumerate(c.indices.tolist()) if ix == j]
    return (True, float(c.values[where[0]])) if where else (False, 0.0)


# ---------------------------------------------------------------- references
def ref_per_element(g: np.ndarray, cs: list[UC], delta: bool, lr: float = 1.0) -> np.ndarray:
    out = []
    for j in range(g.size):
        num = den = 0.0
        for c in cs:
            hit, v = covered(c, j)
            if hit:
                num += c.weight * v
                den += c.weight
        if den == 0:
            out.append(float(g[j]))
        else:
            out.append(float(g[j]) + lr * num / den if delta else num / den)
    return np.array(out)


def ref_apply(g: np.ndarray, cs: list[UC], lr: float) -> np.ndarray:
    out = [float(x) for x in g]
    for j in range(g.size):
        for c in cs:
            hit, v = covered(c, j)
            if hit:
                out[j] += lr * c.weight * v
    return np.array(out)


# ---------------------------------------------------------------- merges
@pytest.mark.parametrize("seed", range(3))
def test_weighted_average_matches_fedavg_formula(seed: int) -> None:
    r = rng(seed)
    g = rand(r)
    cs = [UC(None, rand(r), float(n)) for n in r.integers(1, 500, size=4)]
    expected = [sum(c.weight * float(c.values[j]) for c in cs) / sum(c.weight for c in cs) for j in range(N)]
    np.testing.assert_allclose(agg.weighted_average(g, cs), expected, atol=TOL)


@pytest.mark.parametrize("seed", range(4))
def test_per_element_average_matches_reference(seed: int) -> None:
    r = rng(seed)
    g = rand(r)
    cs = mixed_contributions(r)[1:]  # submodels only, so some coordinates stay uncovered
    got = agg.per_element_average(g, cs)
    np.testing.assert_allclose(got, ref_per_element(g, cs, delta=False), atol=TOL)
    uncovered = np.setdiff1d(np.arange(N), np.concatenate([c.indices for c in cs if c.indices is not None]))
    np.testing.assert_array_equal(got[uncovered], g[uncovered])


def test_per_element_average_with_unit_weights_is_heterofl_count_average() -> None:
    g = np.zeros(4, np.float32)
    cs = [UC(np.array([0, 1]), np.array([2.0, 4.0], np.float32), 1.0),
          UC(np.array([0]), np.array([6.0], np.float32), 1.0)]
    np.testing.assert_allclose(agg.per_element_average(g, cs), [4.0, 4.0, 0.0, 0.0])


@pytest.mark.parametrize("seed", range(3))
def test_per_element_delta_matches_reference_and_weights_form(seed: int) -> None:
    r = rng(seed)
    g = rand(r)
    cs = mixed_contributions(r)
    np.testing.assert_allclose(agg.per_element_delta(g, cs, 0.7), ref_per_element(g, cs, True, 0.7), atol=TOL)
    # Deltas against the current model merge to the same model as the weights they came from.
    as_weights = [UC(c.indices, (g if c.indices is None else g[c.indices]) + c.values, c.weight) for c in cs]
    np.testing.assert_allclose(agg.per_element_delta(g, cs), agg.per_element_average(g, as_weights), atol=TOL)


@pytest.mark.parametrize("seed", range(3))
def test_apply_deltas_matches_reference(seed: int) -> None:
    r = rng(seed)
    g = rand(r)
    cs = mixed_contributions(r)
    np.testing.assert_allclose(agg.apply_deltas(g, cs, 0.5), ref_apply(g, cs, 0.5), atol=TOL)


def test_masked_delta_merge_normalises_weights_l1() -> None:
    r = rng(7)
    g = rand(r)
    cs = mixed_contributions(r)
    total = sum(c.weight for c in cs)
    scaled = [UC(c.indices, c.values, c.weight / total) for c in cs]
    np.testing.assert_allclose(agg.masked_delta_merge(g, cs), ref_apply(g, scaled, 1.0), atol=TOL)


def test_fedbuff_apply_matches_accumulator() -> None:
    r = rng(3)
    g = rand(r)
    staleness = [0, 1, 3, 8]
    deltas = [rand(r) for _ in staleness]
    acc = np.zeros(N)
    for s, d in zip(staleness, deltas, strict=True):  # Δ̄ += Δ_i s(τ_i)
        acc += d.astype(np.float64) / math.sqrt(1 + s)
    expected = g + 0.8 * acc / len(deltas)
    cs = [UC(None, d, weighting.staleness_sqrt(s)) for s, d in zip(staleness, deltas, strict=True)]
    np.testing.assert_allclose(agg.fedbuff_apply(g, cs, 0.8), expected, atol=TOL)


def test_fedasync_mix_dense_and_submodel() -> None:
    r = rng(4)
    g, w = rand(r), rand(r)
    np.testing.assert_allclose(agg.fedasync_mix(g, UC(None, w, 0.3)), 0.7 * g + 0.3 * w, atol=TOL)
    idx = np.array([2, 5, 9])
    got = agg.fedasync_mix(g, UC(idx, w[:3], 0.5))
    expected = g.astype(np.float64).copy()
    expected[idx] = 0.5 * g[idx] + 0.5 * w[:3]
    np.testing.assert_allclose(got, expected, atol=TOL)
    with pytest.raises(RoundError, match="above 1"):
        agg.fedasync_mix(g, UC(None, w, 1.5))


# ---------------------------------------------------------------- weights
def test_staleness_functions() -> None:
    assert weighting.staleness_polynomial(3, 0.5) == pytest.approx(0.5)
    assert weighting.staleness_sqrt(8) == pytest.approx(1 / 3)
    assert weighting.staleness_hinge(4, 10, 4) == 1.0
    assert weighting.staleness_hinge(6, 10, 4) == pytest.approx(1 / 21)
    assert weighting.staleness_constant(99) == 1.0
    with pytest.raises(RoundError, match="negative"):
        weighting.staleness_sqrt(-1)


def test_cos2p_weights_match_per_tensor_reference() -> None:
    """Reference written like Co-S2P's `compute_staleness`: sums over named tensors."""
    r = rng(5)
    shapes = {"a": 10, "b": 20, "c": 27}
    history = {v: {k: r.normal(size=n) for k, n in shapes.items()} for v in range(4)}
    current = 3
    clients = [({k: r.normal(size=n) for k, n in shapes.items()}, 0.5, 1),
               ({k: r.normal(size=n) for k, n in shapes.items()}, 0.25, 3),
               ({k: r.normal(size=n) for k, n in shapes.items()}, 1.0, 0)]
    raw = []
    for grads, rate, tau in clients:
        importance = sum(np.abs(v).sum() for v in grads.values()) / rate
        drift = sum(np.abs(history[current][k] - history[tau][k]).sum() for k in shapes)
        raw.append(importance / (drift + 1))
    expected = np.array(raw) / np.abs(raw).sum()

    def flat(d: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([d[k] for k in shapes]).astype(np.float32)

    got = weighting.cos2p_weights(
        [weighting.l1_norm(flat(g)) for g, _, _ in clients],
        [rate for _, rate, _ in clients],
        [weighting.l1_drift(flat(history[current]), flat(history[tau])) for _, _, tau in clients],
        importance_cap=None,  # the paper's rule; the clip on top is tested in test_robust_merges.py
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got.sum() == pytest.approx(1.0)


def test_normalise_l1_all_zero_gives_equal_weights() -> None:
    np.testing.assert_allclose(weighting.normalise_l1(np.zeros(4)), [0.25] * 4)


# ---------------------------------------------------------------- validation and immutability
BAD = {
    "nan value": UC(None, np.full(N, np.nan, np.float32), 1.0),
    "wrong length": UC(None, np.zeros(N - 1, np.float32), 1.0),
    "index length": UC(np.array([0, 1, 2]), np.zeros(2, np.float32), 1.0),
    "index out of range": UC(np.array([0, N]), np.zeros(2, np.float32), 1.0),
    "negative index": UC(np.array([-1]), np.zeros(1, np.float32), 1.0),
    "repeated index": UC(np.array([3, 3]), np.zeros(2, np.float32), 1.0),
    "float64 values": UC(None, np.zeros(N, np.float64), 1.0),  # type: ignore[arg-type]
    "negative weight": UC(None, np.zeros(N, np.float32), -1.0),
    "inf weight": UC(None, np.zeros(N, np.float32), math.inf),
}


@pytest.mark.parametrize("name", sorted(BAD))
@pytest.mark.parametrize("merge", ["per_element_average", "per_element_delta", "apply_deltas", "fedbuff_apply"])
def test_bad_contribution_raises_and_leaves_global_intact(name: str, merge: str) -> None:
    r = rng(9)
    g = rand(r)
    before = g.copy()
    good = UC(None, rand(r), 1.0)
    with pytest.raises(RoundError):
        getattr(agg, merge)(g, [good, BAD[name]])
    np.testing.assert_array_equal(g, before)


def test_nonfinite_global_and_overflow_are_refused() -> None:
    g = np.zeros(N, np.float32)
    g[0] = np.inf
    with pytest.raises(RoundError, match="non-finite"):
        agg.apply_deltas(g, [])
    big = np.full(N, 3e38, np.float32)
    with pytest.raises(RoundError, match="non-finite"):
        agg.apply_deltas(big, [UC(None, big, 1.0)])


@pytest.mark.parametrize("merge", ["per_element_average", "per_element_delta", "apply_deltas", "masked_delta_merge"])
def test_merges_return_a_new_array(merge: str) -> None:
    r = rng(11)
    g = rand(r)
    before = g.copy()
    out = getattr(agg, merge)(g, mixed_contributions(r))
    assert out.dtype == np.float32 and not np.shares_memory(out, g)
    np.testing.assert_array_equal(g, before)


def test_per_coordinate_weights_in_the_per_element_merge() -> None:
    """Chen & Qin's harvest weighs each coordinate of an update on its own (methods.md §3.5)."""
    g = np.zeros(4, np.float32)
    a = agg.UpdateContribution(np.array([0, 1, 2]), np.array([1, 1, 1], np.float32), 1.0,
                               coord_weights=np.array([3.0, 1.0, 0.0], np.float32))
    b = agg.UpdateContribution(np.array([1, 2, 3]), np.array([5, 5, 5], np.float32), 1.0)
    out = agg.per_element_average(g, [a, b])
    # coord 0: only a (weight 3) -> 1; coord 1: (1*1 + 5*1)/2 = 3; coord 2: a weighs 0 -> 5; coord 3: b -> 5
    np.testing.assert_allclose(out, [1.0, 3.0, 5.0, 5.0])
    with pytest.raises(RoundError, match="only the per-element merges"):
        agg.apply_deltas(g, [a])
    bad = agg.UpdateContribution(None, np.ones(4, np.float32), 1.0, coord_weights=np.ones(3, np.float32))
    with pytest.raises(RoundError, match="3 coordinate weights for 4 values"):
        agg.per_element_average(g, [bad])
