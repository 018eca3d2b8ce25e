"""`chenqin`, device half and spec: Chen & Qin's class-subset sub-models (SEC 2020, methods.md §3).

A device trains the filters relevant to its classes and their classifier rows, with a
local-label cross-entropy (labels mapped to its rows; samples of other classes are not seen).
Which filters those are is the server's choice (server/methods/chenqin.py, from the relevance
of the current global model); the device trains whatever slice it was sent, so its half is the
slicing methods' one.

Profiles: `classes=0+3+7,width=0.5`: the classes and the budget, ⌈width·C⌉ filters per hidden
group (the artifact's size; ONNX Runtime trains fixed graphs, so the budget is structural).
`width=0.5` alone: the classes come from the device's label histogram when the campaign is laid
out (`fleet_profiles`: the classes holding at least `min_share` of its samples, or the balancer's
assignment with `balance = true`).

[method] keys:
    q                top-q share of a layer's filters relevant to a class (0.4)
    relevance_every  rescore the relevance every this many merges (1); 0: only once, at the start
    relevance_batch  samples per relevance pass (the artifact's fixed batch, 64)
    proxy_samples    size of the proxy split the server scores relevance on (500), drawn
                     stratified from the training split by the campaign
    relevance_file   start from these scores (.npz, runtime/relevance.py) instead of scoring the
                     initial model ("": score it)
    min_share        x of "classes with at least x of its samples" (0.1)
    balance          assign classes so each is covered by >= 2 devices, load balanced (false)
    min_keep         minimum keep ratio of the first two hidden groups (0.5): `fleet_profiles`
                     writes it into the profile (`widths=conv1:0.5+conv2:0.5`), so the artifact
                     holds that many filters there
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from runtime.errors import ConfigError
from runtime.methods.base import SliceDevice, SliceSpec
from runtime.profile import Profile, parse_profile

_SHARE_KEYS = ("q", "min_share", "min_keep")  # numbers in (0, 1]
_INT_KEYS = {"relevance_every": 0, "relevance_batch": 1, "proxy_samples": 1}


class Spec(SliceSpec):
    name = "chenqin"
    allowed: ClassVar[frozenset[str]] = frozenset({"classes", "width", "group_widths"})
    param_defaults: ClassVar[Mapping[str, Any]] = {
        "q": 0.4, "relevance_every": 1, "relevance_batch": 64, "proxy_samples": 500, "relevance_file": "",
        "min_share": 0.1, "balance": False, "min_keep": 0.5}
    # Per-element average with per-coordinate weights: the harvest (server/harvest.py).
    strategy_defaults: ClassVar[Mapping[str, Any]] = {"merge": "per-element"}

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        for key in _SHARE_KEYS:
            v = params[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ConfigError(f"[method] chenqin: {key} {v!r} must be a number in (0, 1]")
        for key, lo in _INT_KEYS.items():
            v = params[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"[method] chenqin: {key} {v!r} must be an integer >= {lo}")
        if not isinstance(params["balance"], bool):
            raise ConfigError(f"[method] chenqin: balance {params['balance']!r} must be true or false")
        if not isinstance(params["relevance_file"], str):
            raise ConfigError(f"[method] chenqin: relevance_file {params['relevance_file']!r} must be a path")
        return {**params, **{k: float(params[k]) for k in _SHARE_KEYS}}

    def artifact_profiles(self, profile: str, params: Mapping[str, Any]) -> tuple[str, ...]:
        p = parse_profile(profile)
        if p.classes is None and p.width < 1.0:
            raise ConfigError(f"chenqin profile {profile!r} names no classes; the campaign derives them from the "
                              f"device's labels, or the profile lists them (classes=0+3+7,width=0.5)")
        return (p.canonical(),)

    def proxy_samples(self, params: Mapping[str, Any]) -> int:
        return int(params["proxy_samples"])

    def fleet_profiles(self, params: Mapping[str, Any], profiles: Sequence[str],
                       histograms: Sequence[Sequence[int]], groups: Mapping[str, int]) -> list[str]:
        """Each device's profile with its classes (declared ones checked against its data, the
        others from its label histogram or the balancer) and the minimum keep ratio of the first
        two hidden groups. ConfigError names the device (fleet index) and the class."""
        num_classes = int(groups["classes"])
        first = [g for g in groups if g != "classes"][:2]
        parsed = [parse_profile(p) for p in profiles]
        h = np.zeros((len(profiles), num_classes), dtype=np.int64)
        for d, row in enumerate(histograms):
            if len(row) > num_classes:
                raise ConfigError(f"device {d}: label histogram has {len(row)} classes, the model {num_classes}")
            h[d, :len(row)] = row
        share = float(params["min_share"])
        if params["balance"]:
            costs = [p.width ** 2 for p in parsed]  # per-sample conv FLOPs scale with width²
            derived = balance_classes(h, costs, 2, share)
        else:
            derived = [classes_from_histogram(row, share) for row in h]
        out: list[str] = []
        for d, p in enumerate(parsed):
            classes = p.classes if p.classes is not None else derived[d]
            for c in classes:
                if c >= num_classes:
                    raise ConfigError(f"device {d}: class {c} is out of range for a model of {num_classes} classes")
                if h[d, c] == 0:
                    raise ConfigError(f"device {d}: declares class {c} but holds no sample of it")
            widths = dict(p.group_widths)
            for g in first:
                keep = max(p.width_of(g), float(params["min_keep"]))
                if keep != p.width:
                    widths[g] = min(1.0, keep)
            out.append(Profile(width=p.width, classes=tuple(classes),
                               group_widths=tuple(sorted(widths.items()))).canonical())
        return out


def classes_from_histogram(counts: Sequence[int], min_share: float) -> tuple[int, ...]:
    """The classes holding at least `min_share` of the device's samples."""
    arr = np.asarray(counts, dtype=np.float64)
    if arr.sum() <= 0:
        raise ConfigError("label histogram is empty: the device holds no samples")
    chosen = tuple(int(c) for c in np.flatnonzero(arr >= min_share * arr.sum() - 1e-12))
    return chosen


def balance_classes(histograms: Any, costs: Sequence[float], min_cover: int = 2,
                    min_share: float = 0.0) -> list[tuple[int, ...]]:
    """Greedy class partition (methods.md §3.3): start from each device's classes (≥ min_share
    of its samples); while a class some device holds samples of is covered by fewer than
    `min_cover` devices (or by all that hold it), give it to the least loaded device that holds
    samples of it but does not train it yet. Load = the device's cost (per-sample FLOPs, relative)
    × the samples of the classes it trains."""
    h = np.asarray(histograms, dtype=np.float64)
    cost = np.asarray(costs, dtype=np.float64)
    chosen = [set(classes_from_histogram(row, min_share)) for row in h]

    def load(d: int) -> float:
        return float(cost[d] * h[d, sorted(chosen[d])].sum())

    for c in range(h.shape[1]):
        holders = [d for d in range(len(h)) if h[d, c] > 0]
        while sum(c in s for s in chosen) < min(min_cover, len(holders)):
            d = min((d for d in holders if c not in chosen[d]), key=lambda d: (load(d), d))
            chosen[d].add(c)
    return [tuple(sorted(s)) for s in chosen]


SPEC = Spec()
Device = SliceDevice
