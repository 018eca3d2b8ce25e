"""Robust merges (server/robust.py) against loop-by-loop numpy references, and the strategy keys
that select them."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import ConfigError, RoundError
from server import robust, weighting
from server.aggregate import UpdateContribution
from server.policies import DenseMerge, PerElementMerge
from server.strategies import get_strategy, strategy_defaults


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def dense(values: np.ndarray, weight: float = 1.0) -> UpdateContribution:
    return UpdateContribution(None, np.asarray(values, dtype=np.float32), weight)


def sub(indices: list[int], values: list[float], weight: float = 1.0) -> UpdateContribution:
    return UpdateContribution(np.array(indices, dtype=np.int64), np.array(values, dtype=np.float32), weight)


def covering(n: int, cs: list[UpdateContribution]) -> list[list[float]]:
    """Per coordinate, the values of the contributions that cover it (the reference's view)."""
    cols: list[list[float]] = [[] for _ in range(n)]
    for c in cs:
        idx = range(n) if c.indices is None else c.indices.tolist()
        for j, v in zip(idx, c.values.tolist(), strict=True):
            cols[j].append(float(v))
    return cols


def mixed(seed: int, n: int = 12, k: int = 7) -> list[UpdateContribution]:
    r = rng(seed)
    out = [dense(r.normal(size=n)) for _ in range(k - 3)]
    for _ in range(3):
        idx = np.sort(r.choice(n, size=n // 2, replace=False))
        out.append(UpdateContribution(idx, r.normal(size=idx.size).astype(np.float32), 1.0))
    return out


def test_coordinate_median_matches_per_coordinate_reference() -> None:
    cs = mixed(1)
    got = robust.coordinate_median(12, cs)
    for j, col in enumerate(covering(12, cs)):
        assert got[j] == pytest.approx(float(np.median(col)))


def test_median_leaves_uncovered_coordinates_at_the_global_value() -> None:
    g = np.arange(4, dtype=np.float32)
    med = robust.coordinate_median(4, [sub([0, 1], [1.0, 2.0]), sub([1], [4.0])])
    assert np.isnan(med[2]) and np.isnan(med[3])
    new = robust.apply_robust_delta(g, med, 0.5)
    np.testing.assert_allclose(new, [0.5, 1 + 0.5 * 3.0, 2.0, 3.0])
    assert g.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.34, 0.49])
def test_trimmed_mean_matches_sort_and_cut_reference(beta: float) -> None:
    cs = mixed(2)
    got = robust.trimmed_mean(12, cs, beta)
    for j, col in enumerate(covering(12, cs)):
        s = sorted(col)
        t = int(np.floor(beta * len(s)))
        assert got[j] == pytest.approx(float(np.mean(s[t:len(s) - t])))


def test_trimmed_mean_of_zero_fraction_is_the_plain_mean_and_bad_fraction_refused() -> None:
    cs = [dense(rng(i).normal(size=5)) for i in range(4)]
    np.testing.assert_allclose(robust.trimmed_mean(5, cs, 0.0), np.mean([c.values for c in cs], axis=0), rtol=1e-6)
    with pytest.raises(RoundError, match="trim_fraction"):
        robust.trimmed_mean(5, cs, 0.5)


def test_krum_scores_match_pairwise_reference_and_pick_the_cluster() -> None:
    r = rng(3)
    honest = [dense(1.0 + 0.05 * r.normal(size=6)) for _ in range(5)]
    attacker = dense(np.full(6, -40.0))
    cs = [*honest[:2], attacker, *honest[2:]]
    f = 1
    got = robust.krum_scores(6, cs, f)
    vecs = [c.values.astype(np.float64) for c in cs]
    for i, v in enumerate(vecs):
        d = sorted(float(((v - w) ** 2).sum()) for j, w in enumerate(vecs) if j != i)
        assert got[i] == pytest.approx(sum(d[:len(cs) - f - 2]), rel=1e-9)
    assert 2 not in robust.krum_select(6, cs, f, 3)
    assert robust.krum_select(6, cs, f, 1) == [int(np.argmin(got))]


def test_krum_treats_uncovered_coordinates_as_zero_delta() -> None:
    cs = [sub([0], [1.0]), dense(np.array([1.0, 0.0])), dense(np.array([9.0, 9.0]))]
    got = robust.krum_scores(2, cs, 0)
    assert got[0] == pytest.approx(0.0)  # (1,0) vs (1,0)


def test_bound_norms_clip_and_reject_against_the_lower_median() -> None:
    cs = [dense(np.array([3.0, 4.0])), dense(np.array([0.0, 1.0])), dense(np.array([60.0, 80.0]))]
    clipped, report = robust.bound_norms(cs, "clip", 2.0)
    assert report.norms == pytest.approx((5.0, 1.0, 100.0))
    assert report.bound == pytest.approx(2.0 * 5.0)  # lower median of (1, 5, 100) is 5
    assert report.clipped == (2,) and report.rejected == ()
    np.testing.assert_allclose(clipped[2].values, [6.0, 8.0], rtol=1e-6)
    np.testing.assert_array_equal(clipped[0].values, cs[0].values)
    kept, rej = robust.bound_norms(cs, "reject", 2.0)
    assert rej.rejected == (2,) and len(kept) == 2 and rej.kept == (0, 1)
    # Two updates: the lower median is the smaller, so the big one cannot lift its own bound.
    _, two = robust.bound_norms(cs[1:], "clip", 3.0)
    assert two.bound == pytest.approx(3.0) and two.clipped == (1,)


def test_robust_merge_runs_the_strategys_merge_after_krum_and_validates_input() -> None:
    g = np.zeros(3, dtype=np.float32)
    cs = [dense(np.ones(3), 2.0), dense(np.ones(3) * 1.1, 1.0), dense(np.full(3, 50.0), 1.0),
          dense(np.ones(3) * 0.9, 1.0)]
    cfg = robust.RobustConfig(robust_merge="krum", krum_byzantine=1, krum_select=3)
    new, report = robust.robust_merge(g, cs, DenseMerge(), cfg)
    assert report.merged == (0, 1, 3)
    ref = (2 * 1.0 + 1.1 + 0.9) / 4.0  # DenseMerge's weighted mean of the three kept
    np.testing.assert_allclose(new, [ref] * 3, rtol=1e-6)
    bad = [dense(np.array([np.nan, 0, 0]))]
    with pytest.raises(RoundError, match="non-finite"):
        robust.robust_merge(g, bad, DenseMerge(), cfg)
    assert not g.any()


def test_median_merge_under_per_element_policy_uses_its_server_lr() -> None:
    g = np.ones(3, dtype=np.float32)
    cs = [sub([0, 1], [1.0, 1.0]), sub([0], [3.0]), sub([0], [100.0])]
    new, _ = robust.robust_merge(g, cs, PerElementMerge(server_lr=0.5), robust.RobustConfig(robust_merge="median"))
    np.testing.assert_allclose(new, [1 + 0.5 * 3.0, 1 + 0.5 * 1.0, 1.0])


def test_cos2p_importance_is_clipped_so_a_scaled_delta_cannot_buy_weight() -> None:
    honest = [10.0, 11.0, 9.0]
    w_clean = weighting.cos2p_weights([*honest, 10.0], [1.0] * 4, [0.0] * 4)
    w_attack = weighting.cos2p_weights([*honest, 1000.0], [1.0] * 4, [0.0] * 4)
    assert w_attack[3] <= 3.0 * 10.0 / (10 + 11 + 9 + 30.0) + 1e-12  # capped at 3 x median 10
    unclipped = weighting.cos2p_weights([*honest, 1000.0], [1.0] * 4, [0.0] * 4, importance_cap=None)
    assert unclipped[3] > 0.95 > w_attack[3]
    assert w_clean[3] == pytest.approx(0.25)
    np.testing.assert_allclose(weighting.clip_importance(np.array([1.0, 2.0, 50.0]), np.ones(3), 3.0), [1.0, 2.0, 6.0])
    # Per unit of rate: a dense client (importance ~1/rate of a narrow one's per unit) is not clipped.
    imp, rates = np.array([0.25, 0.25, 0.26, 1.0]), np.array([0.25, 0.25, 0.25, 1.0])
    np.testing.assert_allclose(weighting.clip_importance(imp, rates, 3.0), imp)
    np.testing.assert_allclose(weighting.clip_importance(np.array([0.25, 0.25, 0.26, 9.0]), rates, 3.0),
                               [0.25, 0.25, 0.26, 3.0])


def test_strategy_keys_select_robust_merges_and_bad_values_name_themselves() -> None:
    s = get_strategy("fedavg", robust_merge="trimmed-mean", trim_fraction=0.25, norm_bound="clip")
    assert s.robust == robust.RobustConfig(robust_merge="trimmed-mean", trim_fraction=0.25, norm_bound="clip")
    assert s.params["robust_merge"] == "trimmed-mean" and "norm_factor" in strategy_defaults("semi-async")
    assert get_strategy("semi-async").robust == robust.RobustConfig()
    for key, value, msg in (("robust_merge", "mode", "robust_merge='mode'"), ("trim_fraction", 0.5, "trim_fraction"),
                            ("norm_factor", 0.5, "norm_factor"), ("krum_select", 0, "krum_select"),
                            ("norm_bound", True, "norm_bound")):
        with pytest.raises(ConfigError, match=msg):
            get_strategy("fedbuff", **{key: value})
    with pytest.raises(ConfigError, match="merges client weights"):
        get_strategy("fedasync", robust_merge="median")


def test_block_by_block_equals_one_block_with_unsorted_indices(monkeypatch: pytest.MonkeyPatch) -> None:
    r = rng(9)
    cs = [*mixed(4), UpdateContribution(np.array([11, 0, 5, 3], dtype=np.int64),
                                        r.normal(size=4).astype(np.float32), 1.0)]
    whole = (robust.coordinate_median(12, cs), robust.trimmed_mean(12, cs, 0.2), robust.krum_scores(12, cs, 1))
    monkeypatch.setattr(robust, "BLOCK", 5)
    blocked = (robust.coordinate_median(12, cs), robust.trimmed_mean(12, cs, 0.2), robust.krum_scores(12, cs, 1))
    for a, b in zip(whole, blocked, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    cols = covering(12, cs)
    assert blocked[0][11] == pytest.approx(float(np.median(cols[11])))
