"""Partitioners: invariants for every scheme, the skew each scheme promises, and spec parsing."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.partition import parse_partition, partition
from runtime.errors import ConfigError, DatasetError

Array = npt.NDArray[np.int64]

# 10 classes of 100 samples, interleaved so that index order says nothing about the label.
LABELS = np.tile(np.arange(10), 100)


def check_invariants(parts: list[Array], n_samples: int, n_parts: int) -> Array:
    """Sorted int64 in-range disjoint arrays; returns their union."""
    assert len(parts) == n_parts
    for part in parts:
        assert part.dtype == np.int64 and part.ndim == 1
        assert (np.diff(part) > 0).all()  # sorted and no repeats within a part
        assert part.size == 0 or (part[0] >= 0 and part[-1] < n_samples)
    union: Array = np.concatenate(parts)
    assert len(np.unique(union)) == len(union)  # no sample in two parts
    return union


def mean_label_entropy(labels: Array, parts: list[Array]) -> float:
    entropies = []
    for part in parts:
        p = np.bincount(labels[part], minlength=10) / len(part)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


@pytest.mark.parametrize(("scheme", "kw"), [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("shards", {"k": 3})])
def test_full_coverage_and_determinism(scheme: str, kw: dict[str, Any]) -> None:
    parts = partition(LABELS, 7, scheme, seed=5, **kw)
    assert sorted(check_invariants(parts, 1000, 7)) == list(range(1000))
    again = partition(LABELS, 7, scheme, seed=5, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(LABELS, 7, scheme, seed=6, **kw)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_and_label_mix() -> None:
    parts = partition(LABELS, 7, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert mean_label_entropy(LABELS, parts) > 0.95 * np.log(10)


def test_dirichlet_skew_falls_as_alpha_grows() -> None:
    entropy = {alpha: np.mean([mean_label_entropy(LABELS, partition(LABELS, 10, "dirichlet", seed=s,
                                                                     alpha=alpha)) for s in range(3)])
               for alpha in (0.05, 0.5, 5.0, 100.0)}
    values = list(entropy.values())
    assert values == sorted(values) and len(set(values)) == 4
    assert entropy[0.05] < 0.4 * np.log(10)  # mostly one or two labels per part
    assert entropy[100.0] > 0.97 * np.log(10)  # close to iid


def test_dirichlet_rounds_each_class_fairly() -> None:
    # Near-uniform proportions: each class's 100 samples go 14 or 15 to each of 7 parts, so
    # rounding leftovers must not pile onto one part.
    parts = partition(LABELS, 7, "dirichlet", seed=0, alpha=1e6)
    for c in range(10):
        assert {int((LABELS[p] == c).sum()) for p in parts} <= {14, 15}


def test_dirichlet_min_size_guaranteed_even_when_draws_rarely_allow_it() -> None:
    parts = partition(LABELS, 100, "dirichlet", seed=0, alpha=0.01, min_size=8)
    assert min(len(p) for p in parts) >= 8
    assert len(check_invariants(parts, 1000, 100)) == 1000
    relaxed = partition(LABELS, 100, "dirichlet", seed=0, alpha=0.01, min_size=0)
    assert min(len(p) for p in relaxed) == 0  # without the guarantee, tiny alpha starves parts


def test_shards_give_k_labels_per_part_when_shards_align_with_classes() -> None:
    parts = partition(LABELS, 5, "shards", seed=3, k=2)  # 10 shards of 100 = one class each
    for part in parts:
        assert len(part) == 200
        assert len(np.unique(LABELS[part])) == 2
    uneven = partition(LABELS, 3, "shards", seed=3, k=4)  # 12 shards of 83-84 samples
    assert all(len(np.unique(LABELS[p])) <= 8 for p in uneven)


def test_classes_scheme_splits_shared_classes_evenly() -> None:
    subsets = [[0, 1], [1, 2], [1], [9]]
    parts = partition(LABELS, 4, "classes", seed=0, classes=subsets)
    union = check_invariants(parts, 1000, 4)
    for part, subset in zip(parts, subsets, strict=True):
        assert set(LABELS[part]) == set(subset)
    # Class 1 has 100 samples over 3 holders: 34/33/33 in some order.
    shares = sorted(int((LABELS[p] == 1).sum()) for p in parts[:3])
    assert shares == [33, 33, 34]
    # Everything of the listed classes is used, nothing else.
    assert sorted(union) == sorted(np.flatnonzero(np.isin(LABELS, [0, 1, 2, 9])))


@pytest.mark.parametrize(
    ("scheme", "n_parts", "kw", "message"),
    [
        ("random", 2, {}, "unknown partition scheme 'random'; expected one of iid, dirichlet"),
        ("iid", 0, {}, r"n_parts must be an integer in \[1, 1000\].*got 0"),
        ("iid", 1001, {}, r"n_parts must be an integer in \[1, 1000\].*got 1001"),
        ("iid", 2.0, {}, "n_parts must be an integer"),
        ("iid", 2, {"alpha": 1.0}, r"unexpected \['alpha'\]"),
        ("dirichlet", 2, {}, r"missing parameter\(s\) \['alpha'\]"),
        ("dirichlet", 2, {"alpha": 0.0}, "alpha must be a finite number > 0, got 0.0"),
        ("dirichlet", 2, {"alpha": -1}, "alpha must be a finite number > 0, got -1"),
        ("dirichlet", 2, {"alpha": float("nan")}, "got nan"),
        ("dirichlet", 200, {"alpha": 1.0, "min_size": 6}, r"min_size must be an integer in \[0, 5\]"),
        ("shards", 2, {"k": 0}, "k must be an integer in"),
        ("shards", 200, {"k": 6}, r"k must be an integer in \[1, 5\].*got 6"),
        ("classes", 2, {"classes": [[0], []]}, "part 1 has an empty class subset"),
        ("classes", 2, {"classes": [[0], [10]]}, r"part 1 lists class 10, outside \[0, 10\)"),
        ("classes", 2, {"classes": [[0], [-1]]}, "lists class -1"),
        ("classes", 2, {"classes": [[0], [3, 3]]}, "part 1 lists class 3 twice"),
        ("classes", 3, {"classes": [[0], [1]]}, r"one class list per part \(3\), got 2"),
        ("classes", 2, {"classes": [[0], [11]], "num_classes": 12}, "part 1 gets no samples"),
    ],
)
def test_bad_parameters_raise_one_clear_config_error(scheme: str, n_parts: Any, kw: dict[str, Any],
                                                     message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        partition(LABELS, n_parts, scheme, seed=0, **kw)


@pytest.mark.parametrize("labels", [np.zeros((4, 2), np.int64), np.array([0.5, 1.0]), np.array([0, -1])])
def test_bad_labels_raise_dataset_error(labels: Array) -> None:
    with pytest.raises(DatasetError, match="labels must be a 1-D array of non-negative integers"):
        partition(labels, 1, "iid", seed=0)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=1, max_size=120),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_every_scheme_is_a_disjoint_cover(labels: list[int], data: st.DataObject, seed: int) -> None:
    y = np.array(labels, dtype=np.int64)
    n_parts = data.draw(st.integers(1, len(y)), label="n_parts")
    scheme = data.draw(st.sampled_from(["iid", "dirichlet", "shards"]), label="scheme")
    kw: dict[str, Any] = {}
    if scheme == "dirichlet":
        min_size = data.draw(st.integers(0, len(y) // n_parts), label="min_size")
        kw = {"alpha": data.draw(st.floats(0.01, 50.0), label="alpha"), "min_size": min_size}
    elif scheme == "shards":
        kw = {"k": data.draw(st.integers(1, len(y) // n_parts), label="k")}
    parts = partition(y, n_parts, scheme, seed=seed, **kw)
    assert sorted(check_invariants(parts, len(y), n_parts)) == list(range(len(y)))
    if scheme == "dirichlet":
        assert min(len(p) for p in parts) >= kw["min_size"]
    if scheme == "shards":
        assert all(len(p) > 0 for p in parts)


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=5, max_size=80),
    subsets=st.lists(st.sets(st.integers(0, 4), min_size=1), min_size=1, max_size=5),
    seed=st.integers(0, 1000),
)
def test_property_classes_parts_hold_only_their_classes(labels: list[int], subsets: list[set[int]],
                                                        seed: int) -> None:
    y = np.array(labels, dtype=np.int64)
    classes = [sorted(s) for s in subsets]
    try:
        parts = partition(y, len(classes), "classes", seed=seed, classes=classes, num_classes=5)
    except ConfigError as exc:
        assert "gets no samples" in str(exc)  # the only legitimate failure for valid subsets
        return
    union = check_invariants(parts, len(y), len(classes))
    listed = set().union(*subsets)
    assert sorted(union) == sorted(np.flatnonzero(np.isin(y, sorted(listed))))
    for part, subset in zip(parts, subsets, strict=True):
        assert set(y[part].tolist()) <= subset


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("iid", ("iid", {})),
        (" Dirichlet:0.5 ", ("dirichlet", {"alpha": 0.5})),
        ("dirichlet:1e-2", ("dirichlet", {"alpha": 0.01})),
        ("shards:2", ("shards", {"k": 2})),
        ("classes:0-4;5-9", ("classes", {"classes": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]})),
        ("classes:0,2, 4;1-3,7", ("classes", {"classes": [[0, 2, 4], [1, 2, 3, 7]]})),
    ],
)
def test_parse_partition(spec: str, expected: tuple[str, dict[str, Any]]) -> None:
    assert parse_partition(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("zipf:2", "unknown scheme 'zipf'"),
        ("iid:3", "iid takes no parameter"),
        ("dirichlet", "dirichlet needs a parameter"),
        ("dirichlet:lots", "alpha 'lots' is not a number"),
        ("dirichlet:0", "alpha must be a finite number > 0"),
        ("dirichlet:-0.5", "alpha must be a finite number > 0"),
        ("dirichlet:inf", "alpha must be a finite number > 0"),
        ("shards:1.5", "'1.5' is not an integer"),
        ("shards:0", "shards per part must be >= 1"),
        ("classes:0-4;;5", "class subset 1 is empty"),
        ("classes:4-0", "range '4-0' runs backwards"),
        ("classes:a-3", "'a' is not an integer"),
    ],
)
def test_parse_partition_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_partition(spec)


def test_parsed_spec_feeds_partition() -> None:
    scheme, kw = parse_partition("classes:0-4;5-9")
    parts = partition(LABELS, 2, scheme, seed=0, **kw)
    assert set(LABELS[parts[0]]) == {0, 1, 2, 3, 4} and len(parts[1]) == 500
