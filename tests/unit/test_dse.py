"""`orchard dse`: NSGA-II's sorting and selection against brute force, a small real search on
the MLP (real ONNX Runtime timing, a real proxy split), the front file round trip and plot, and
one-line refusals of bad fronts and settings."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from models.dse import DseConfig, crowding, dominates, non_dominated_sort, search, select, write_front
from runtime.errors import ConfigError
from runtime.methods import spec
from testbed.cli import main


def brute_rank(points):
    """Rank = 0 if nobody dominates it, else 1 + the max rank of those that do (recursive)."""
    ranks = {}

    def rank(i):
        if i not in ranks:
            above = [j for j in range(len(points)) if dominates(points[j], points[i])]
            ranks[i] = 0 if not above else 1 + max(rank(j) for j in above)
        return ranks[i]

    return [rank(i) for i in range(len(points))]


def test_non_dominated_sort_matches_brute_force() -> None:
    rng = np.random.default_rng(4)
    for _ in range(20):
        pts = [(float(a), float(b)) for a, b in rng.integers(0, 6, size=(12, 2))]
        got = {i: r for r, front in enumerate(non_dominated_sort(pts)) for i in front}
        assert [got[i] for i in range(len(pts))] == brute_rank(pts)


def test_crowding_and_selection() -> None:
    pts = [(1.0, 0.1), (2.0, 0.5), (3.0, 0.6), (10.0, 0.9), (5.0, 0.2)]
    d = crowding(pts, [0, 1, 2, 3])
    assert d[0] == d[3] == float("inf")
    assert d[1] == pytest.approx((3 - 1) / 9 + (0.6 - 0.1) / 0.8) and d[2] == pytest.approx((10 - 2) / 9 + 0.4 / 0.8)
    assert sorted(select(pts, 4)) == [0, 1, 2, 3]  # the dominated (5 ms, 0.2) goes first
    assert set(select(pts, 3)) >= {0, 3}  # the extremes survive a cut inside a front
    for combo in itertools.permutations(range(5), 2):
        assert dominates(pts[combo[0]], pts[combo[1]]) is not dominates(pts[combo[1]], pts[combo[0]]) or \
            not dominates(pts[combo[0]], pts[combo[1]])


def test_small_search_writes_a_front_the_method_reads(tmp_path, artifact_cache) -> None:
    cfg = DseConfig(model="mlp", dataset="digits", samples=400, population=3, generations=1, budget_board_s=0.3,
                    timing_steps=4, max_steps=20, grid=(0.0, 0.5), host_speed=1.0, board="rpi4b-4gb")
    lines: list[str] = []
    doc = search(cfg, artifact_cache, log=lines.append)
    assert any("generation 1/1" in ln for ln in lines) and len(doc["evaluated"]) >= 2  # progress shown
    anchors = {json.dumps(c["drop"], sort_keys=True) for c in doc["evaluated"] if c["anchor"]}
    assert anchors == {"{}", json.dumps({"fc1": 0.5, "fc2": 0.5})}  # the uniform vectors are always in
    steps = [v["step_ms"] for v in doc["vectors"]]
    assert steps == sorted(steps) and all(v["flops_ratio"] <= 1.0 for v in doc["vectors"])
    paths = write_front(doc, tmp_path / "run", artifact_cache)
    assert (tmp_path / "run" / "front.png").stat().st_size > 1000
    params = spec("distreal").params({"pareto": str(paths[0])})
    assert params["front"]["model"] == "mlp" and params["front"]["board"] == "rpi4b-4gb"


def test_bad_settings_and_fronts_are_one_line(tmp_path, capsys) -> None:
    for kwargs, match in (({"grid": (0.0, 1.0)}, "grid rate 1.0 is outside"), ({"grid": (0.25,)}, "must hold 0"),
                          ({"model": "vgg"}, "unknown model 'vgg'"), ({"population": 0}, "population 0")):
        with pytest.raises(ConfigError, match=match):
            DseConfig(**kwargs)
    (tmp_path / "empty.json").write_text(json.dumps({"format": 1, "model": "cnn", "groups": {"conv1": 32},
                                                     "vectors": []}))
    (tmp_path / "corrupt.json").write_bytes(b"\x00\xff{")
    for name, match in (("empty.json", "the Pareto front is empty"), ("corrupt.json", "is corrupt")):
        with pytest.raises(ConfigError, match=match):
            spec("distreal").params({"pareto": str(tmp_path / name)})
    code = main(["dse", "--model", "mlp", "--population", "0", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "population 0" in err[0]


def test_time_budget_stops_the_search_between_evaluations(artifact_cache) -> None:
    cfg = DseConfig(model="mlp", dataset="digits", samples=400, population=4, generations=3, budget_board_s=0.3,
                    timing_steps=4, max_steps=20, grid=(0.0, 0.25, 0.5), host_speed=1.0, time_budget_s=1e-3)
    doc = search(cfg, artifact_cache, log=lambda line: None)
    assert doc["search"]["stopped_by_time_budget"] is True
    assert len(doc["evaluated"]) == 2  # it always scores two, so a front exists, then stops
