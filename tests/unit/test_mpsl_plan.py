"""`orchard mpsl plan`: Eq. 4 against a hand count, the exact DP against brute force, caps."""

from __future__ import annotations

import numpy as np
import pytest

from models.mpsl_plan import (
    LayerProfile,
    NodeSpec,
    Setting,
    best_split,
    brute_force_split,
    check_fits,
    estimate,
    part_mem_mb,
    stages_from_cuts,
)
from runtime.errors import ConfigError

MB = 1024 * 1024


def _layers(fwd, bwd, params_mb=None, act=1000):
    params_mb = params_mb or [1.0] * len(fwd)
    return [LayerProfile(f"l{i}", f, b, act, act, int(p * MB)) for i, (f, b, p) in enumerate(zip(fwd, bwd, params_mb,
                                                                                                   strict=True))]


def test_eq4_by_hand():
    layers = _layers([0.1, 0.2, 0.3, 0.05], [0.2, 0.4, 0.5, 0.1])
    nodes = [NodeSpec("a", 1e9), NodeSpec("b", 1e9)]
    s = Setting(owners=3, batches=4, local_epochs=2, owner_slowdown=2.0, uplink_mbit=8.0, downlink_mbit=16.0,
                node_link_mbit=1e12)
    est = estimate(layers, 1, 1, [[1], [2]], nodes, s)
    comm_up, comm_down = 1000 * 8 / 8e6, 1000 * 8 / 16e6
    start = 0.1 * 2 + comm_up
    end = comm_down + 0.2 * 2
    pipe_full = max(0.2, 0.3) + max(0.4, 0.5)
    pipe_empty = 0.2 + 0.3 + 0.4 + 0.5
    assert est.pipe_full_s == pytest.approx(pipe_full)
    assert est.t_all_s == pytest.approx(start + pipe_empty + (2 * 4 * 3 - 1) * pipe_full + end, rel=1e-6)
    # One node: Eq. 4 is the one-hop formula, startT + r·B·K·(fwd_2 + bwd_2) + endT.
    one = estimate(layers, 1, 1, [[1, 2]], nodes[:1], s)
    assert one.t_all_s == pytest.approx(start + 2 * 4 * 3 * (0.5 + 0.9) + end, rel=1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_dp_split_is_exact(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(3, 9))
    layers = _layers(list(rng.uniform(0.01, 1, m + 2)), list(rng.uniform(0.01, 2, m + 2)),
                     list(rng.uniform(0.1, 3, m + 2)))
    n = int(rng.integers(1, min(4, m) + 1))
    nodes = [NodeSpec(f"n{i}", float(rng.uniform(3, 20)), float(rng.uniform(0.5, 2))) for i in range(n)]
    middle = list(range(1, m + 1))
    ref = brute_force_split(layers, middle, nodes, owners=2)
    if ref is None:
        with pytest.raises(ConfigError, match="no split of the middle layers"):
            best_split(layers, middle, nodes, owners=2)
        return
    stages = best_split(layers, middle, nodes, owners=2)
    f = max(sum(layers[j].fwd_s for j in st) / x.speed for st, x in zip(stages, nodes, strict=True))
    b = max(sum(layers[j].bwd_s for j in st) / x.speed for st, x in zip(stages, nodes, strict=True))
    assert f + b == pytest.approx(ref[0])
    assert [j for st in stages for j in st] == middle and all(stages)


def test_plan_over_a_memory_cap_is_one_line():
    layers = _layers([0.1] * 4, [0.1] * 4, [1.0, 2.0, 3.0, 1.0])
    with pytest.raises(ConfigError, match=r"part \(l1,l2\) needs 10.0 MB for 2 owners on compute node a, "
                                          r"over its memory cap of 8 MB") as exc:
        check_fits(layers, [[1, 2]], [NodeSpec("a", 8)], owners=2)
    assert "\n" not in str(exc.value)
    assert part_mem_mb(layers[1:3], 2) == pytest.approx(2 * (5 * MB + 1000) / MB)
    with pytest.raises(ConfigError, match="cut point 'l3' is not a middle layer"):
        stages_from_cuts(layers, 1, 1, ["l3"])
    assert stages_from_cuts(layers, 1, 1, ["l1"]) == [[1], [2]]


def test_cli_plan_prints_plan_and_refuses_caps_in_one_line(tmp_path, capsys, artifact_cache):
    from testbed.cli import main

    base = ["mpsl", "plan", "--dataset", "digits", "--owners", "2", "--nodes", "2", "--batch", "8",
            "--cache", str(artifact_cache)]
    assert main([*base, "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "owners keep conv1+conv2 | out" in out and "estimate (Eq. 4-6)" in out
    assert main([*base, "--mem-cap-mb", "0.01"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no split of the middle layers") and "\n" not in err
    assert main([*base, "--node-cuts", "conv4", "--mem-cap-mb", "0.05"]) == 3
    assert "over its memory cap of 0.05 MB" in capsys.readouterr().err
    assert main([*base, "--node-cuts", "conv9"]) == 3
    assert "cut point 'conv9'" in capsys.readouterr().err


def test_run_file_rejects_unknown_keys(tmp_path):
    from testbed.mpsl_cli import load_run_file

    f = tmp_path / "r.toml"
    f.write_text('[defaults]\nepochs = 1\n[[run]]\nmode = "mpsl"\nowners = 2\nnode = 2\n')
    with pytest.raises(ConfigError, match=r"\[\[run\]\] #0 has unknown key 'node'"):
        load_run_file(f)
    f.write_text('[[run]]\nmode = "split"\nowners = 2\n')
    with pytest.raises(ConfigError, match="mode 'split' must be one of mpsl, fedavg"):
        load_run_file(f)
    from pathlib import Path

    shipped = load_run_file(Path(__file__).resolve().parents[2] / "campaigns/compare-mpsl.toml")
    assert {(s.owners, s.nodes) for s in shipped if s.mode == "mpsl"} >= {(4, 1), (4, 2), (4, 3)}
    assert sorted({s.nodes for s in shipped if s.mode == "mpsl"}) == [1, 2, 3]
