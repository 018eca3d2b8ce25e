"""Split a labelled dataset across devices.

Schemes: "iid" (uniform shuffle), "dirichlet" (per-class Dirichlet(α) label skew, Hsu et al.
2019), "shards" (label-sorted shards, McMahan et al. 2017) and "classes" (explicit class subsets
per part). Every scheme returns one sorted int64 index array per part, the parts are disjoint,
and the result depends only on the labels, the parameters and the seed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.errors import ConfigError, DatasetError

IndexArray = npt.NDArray[np.int64]

SCHEMES = ("iid", "dirichlet", "shards", "classes")
# Full re-draws before topping up small parts by hand. With tiny α and many parts, a draw where
# every part gets min_size samples can be so rare that re-drawing alone would never finish.
DIRICHLET_REDRAWS = 100
# Per scheme: required keyword parameters, and optional ones with their defaults.
_PARAMS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "iid": ((), {}),
    "dirichlet": (("alpha",), {"min_size": 1}),
    "shards": (("k",), {}),
    "classes": (("classes",), {"num_classes": None}),
}


def partition(labels: npt.ArrayLike, n_parts: int, scheme: str, *, seed: int, **kw: Any) -> list[IndexArray]:
    """Index arrays into `labels`, one per part.

    iid: no parameters; part sizes differ by at most one.
    dirichlet: alpha > 0 (small = skewed), min_size (default 1) samples guaranteed per part.
    shards: k shards per part; the label-sorted samples are cut into n_parts * k shards.
    classes: classes = one list of class ids per part, num_classes (default max label + 1);
        a class listed by several parts is split evenly among them; unlisted classes are unused.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise DatasetError(f"partition: labels must be a 1-D array of non-negative integers, "
                           f"got {y.dtype} {y.shape}")
    if not _is_int(n_parts) or not 1 <= n_parts <= len(y):
        raise ConfigError(f"{scheme}: n_parts must be an integer in [1, {len(y)}] (the number of samples), "
                          f"got {n_parts!r}")
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    required, optional = _PARAMS[scheme]
    missing = [key for key in required if key not in kw]
    unexpected = sorted(set(kw) - set(required) - set(optional))
    if missing or unexpected:
        raise ConfigError(f"{scheme}: missing parameter(s) {missing}, unexpected {unexpected}; "
                          f"takes {', '.join(required + tuple(optional)) or 'no parameters'}")
    params = {**optional, **kw}
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(y)), n_parts)
    elif scheme == "dirichlet":
        parts = _dirichlet(y, n_parts, params["alpha"], params["min_size"], rng)
    elif scheme == "shards":
        parts = _shards(y, n_parts, params["k"], rng)
    else:
        parts = _classes(y, n_parts, params["classes"], params["num_classes"], rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"dirichlet: alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def _split_counts(proportions: npt.NDArray[np.float64], total: int) -> npt.NDArray[np.int64]:
    """Integer counts summing to `total`, as close to proportions * total as possible."""
    shares = proportions * total
    counts: npt.NDArray[np.int64] = np.floor(shares).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(counts - shares, kind="stable")[:short]] += 1  # largest remainders first
    return counts


def _dirichlet(y: IndexArray, n_parts: int, alpha: Any, min_size: Any,
               rng: np.random.Generator) -> list[IndexArray]:
    alpha = _check_alpha(alpha)
    if not _is_int(min_size) or min_size < 0 or min_size * n_parts > len(y):
        raise ConfigError(f"dirichlet: min_size must be an integer in [0, {len(y) // n_parts}] for "
                          f"{n_parts} parts of {len(y)} samples, got {min_size!r}")
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    for _ in range(DIRICHLET_REDRAWS):
        parts = _dirichlet_draw(by_class, n_parts, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    return _top_up(parts, min_size, rng)


def _dirichlet_draw(by_class: list[IndexArray], n_parts: int, alpha: float,
                    rng: np.random.Generator) -> list[IndexArray]:
    pieces: list[list[IndexArray]] = [[] for _ in range(n_parts)]
    for members in by_class:
        proportions = rng.dirichlet(np.full(n_parts, alpha))
        if not np.all(np.isfinite(proportions)):  # every gamma draw underflowed: all mass on one part
            proportions = np.eye(n_parts)[rng.integers(n_parts)]
        cuts = np.cumsum(_split_counts(proportions, len(members)))[:-1]
        for part, piece in enumerate(np.split(members, cuts)):
            pieces[part].append(piece)
    return [np.concatenate(p) for p in pieces]


def _top_up(parts: list[IndexArray], min_size: int, rng: np.random.Generator) -> list[IndexArray]:
    """Move random samples from the largest parts into parts below min_size (the caller checked
    that n_parts * min_size samples exist, so the largest part always has some to spare)."""
    parts = list(parts)
    for needy in range(len(parts)):
        while len(parts[needy]) < min_size:
            donor = int(np.argmax([len(p) for p in parts]))
            take = min(min_size - len(parts[needy]), len(parts[donor]) - min_size)
            order = rng.permutation(len(parts[donor]))
            parts[needy] = np.concatenate([parts[needy], parts[donor][order[:take]]])
            parts[donor] = parts[donor][order[take:]]
    return parts


def _shards(y: IndexArray, n_parts: int, k: Any, rng: np.random.Generator) -> list[IndexArray]:
    if not _is_int(k) or k < 1 or n_parts * k > len(y):
        raise ConfigError(f"shards: k must be an integer in [1, {len(y) // n_parts}] so that {n_parts} parts "
                          f"x k shards fit in {len(y)} samples, got {k!r}")
    # Shuffle before the stable sort so which samples of a label share a shard depends on the seed.
    shuffled = rng.permutation(len(y))
    by_label = shuffled[np.argsort(y[shuffled], kind="stable")]
    shards = np.array_split(by_label, n_parts * k)
    owners = rng.permutation(n_parts * k).reshape(n_parts, k)
    return [np.concatenate([shards[s] for s in row]) for row in owners]


def _classes(y: IndexArray, n_parts: int, classes: Any, num_classes: Any,
             rng: np.random.Generator) -> list[IndexArray]:
    if not isinstance(classes, (list, tuple)) or len(classes) != n_parts:
        count = len(classes) if isinstance(classes, (list, tuple)) else type(classes).__name__
        raise ConfigError(f"classes: need one class list per part ({n_parts}), got {count}")
    if num_classes is None:
        num_classes = int(y.max()) + 1
    elif not _is_int(num_classes) or num_classes < 1:
        raise ConfigError(f"classes: num_classes must be a positive integer, got {num_classes!r}")
    holders: dict[int, list[int]] = {}
    for part, subset in enumerate(classes):
        if not isinstance(subset, (list, tuple, range)) or len(subset) == 0:
            raise ConfigError(f"classes: part {part} has an empty class subset {subset!r}")
        for c in subset:
            if not _is_int(c) or not 0 <= c < num_classes:
                raise ConfigError(f"classes: part {part} lists class {c!r}, outside [0, {num_classes})")
            if part in holders.get(int(c), []):
                raise ConfigError(f"classes: part {part} lists class {c} twice")
            holders.setdefault(int(c), []).append(part)
    pieces: list[list[IndexArray]] = [[] for _ in range(n_parts)]
    for c, parts in sorted(holders.items()):
        members = rng.permutation(np.flatnonzero(y == c))
        # Shuffle the holders so the one-sample remainders of uneven splits do not always go to
        # the first listed part.
        for part, piece in zip(rng.permutation(parts), np.array_split(members, len(parts)), strict=True):
            pieces[part].append(piece)
    result = [np.concatenate(p) for p in pieces]
    for part, indices in enumerate(result):
        if len(indices) == 0:
            raise ConfigError(f"classes: part {part} gets no samples: its classes {list(classes[part])} "
                              "have none in these labels")
    return result


def _parse_int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"partition spec {spec!r}: {text.strip()!r} is not an integer") from None


def parse_partition(spec: str) -> tuple[str, dict[str, Any]]:
    """"iid" | "dirichlet:<alpha>" | "shards:<k>" | "classes:<list>;<list>;..." -> (scheme, kwargs).

    A class list is comma-separated ids or inclusive ranges, e.g. "classes:0-4;5-9" or
    "classes:0,2,4;1,3".
    """
    scheme, has_arg, arg = spec.strip().partition(":")
    scheme = scheme.strip().lower()
    arg = arg.strip()
    if scheme not in SCHEMES:
        raise ConfigError(f"partition spec {spec!r}: unknown scheme {scheme!r}; expected one of "
                          "iid, dirichlet:<alpha>, shards:<k>, classes:<ids>;<ids>;...")
    if scheme == "iid":
        if has_arg:
            raise ConfigError(f"partition spec {spec!r}: iid takes no parameter")
        return "iid", {}
    if not arg:
        raise ConfigError(f"partition spec {spec!r}: {scheme} needs a parameter after ':'")
    if scheme == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise ConfigError(f"partition spec {spec!r}: alpha {arg!r} is not a number") from None
        return "dirichlet", {"alpha": _check_alpha(alpha)}
    if scheme == "shards":
        k = _parse_int(arg, spec)
        if k < 1:
            raise ConfigError(f"partition spec {spec!r}: shards per part must be >= 1, got {k}")
        return "shards", {"k": k}
    groups: list[list[int]] = []
    for group in arg.split(";"):
        ids: list[int] = []
        for item in filter(None, (t.strip() for t in group.split(","))):
            low, dash, high = item.partition("-")
            first, last = _parse_int(low, spec), _parse_int(high, spec) if dash else None
            if last is not None and last < first:
                raise ConfigError(f"partition spec {spec!r}: range {item!r} runs backwards")
            ids.extend(range(first, (first if last is None else last) + 1))
        if not ids:
            raise ConfigError(f"partition spec {spec!r}: class subset {len(groups)} is empty")
        groups.append(ids)
    return "classes", {"classes": groups}
