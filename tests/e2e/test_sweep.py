"""Sweeps and seeds end to end: real campaigns (broker, server, throttled device processes), then
the table and band plots computed from their run folders."""

from __future__ import annotations

import json

from tests.e2e.test_campaign import campaign_file, cgroups, orchard  # noqa: F401  (cgroups: a fixture)

FLEET = """
[[fleet]]
name = "orin"
board = "jetson-orin-nano"
count = 1
profile = "dense"
[[fleet]]
name = "pi5"
board = "rpi5"
count = 2
profile = "width=0.5"
"""
SWEEP = """
[sweep]
seeds = [0, 1, 2]
target_accuracy = 0.3
[[sweep.variant]]
name = "heterofl"
[[sweep.variant]]
name = "smallest"
fleet = { orin = { profile = "width=0.5" } }
"""


def test_sweep_runs_variants_as_real_campaigns_and_tabulates(tmp_path, cgroups):  # noqa: F811
    path = campaign_file(tmp_path, "sw", FLEET, strategy="fedavg", rounds=3, extra=SWEEP)
    path.write_text(path.read_text().replace('name = "fedavg"', 'name = "fedavg"\nmerge = "per-element"'))
    out = tmp_path / "sweep"
    proc = orchard("campaign", "sweep", str(path), "--out", str(out), "--seeds", "4", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((out / "sweep.json").read_text())
    assert [(r["variant"], r["seed"], r["error"]) for r in table["runs"]] == [("heterofl", 4, None),
                                                                                ("smallest", 4, None)]
    hetero = json.loads((out / "heterofl" / "seed-4" / "summary.json").read_text())
    smallest = json.loads((out / "smallest" / "seed-4" / "summary.json").read_text())
    assert (hetero["campaign"], smallest["campaign"]) == ("sw-heterofl", "sw-smallest")
    # The server scored the half-width submodel at every version; the all-submodel variant serves it.
    assert hetero["served_profile"] == "dense" and smallest["served_profile"] == "width=0.5"
    assert set(hetero["accuracy_per_profile"]) == {"dense", "width=0.5"}
    assert all("accuracy[width=0.5]" in r for r in smallest["per_round"])
    assert smallest["final_accuracy"] == smallest["accuracy_per_profile"]["width=0.5"]
    for s in (hetero, smallest):
        assert [g["group"] for g in s["groups"]] == ["orin", "pi5"]
        assert all(g["step_ms_median"] and g["peak_rss_mb"] for g in s["groups"])
        assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in s["per_round"])
    # Same fleet, same rounds: a dense orin sends more per round than a half-width one.
    assert hetero["bytes_up_total"] > smallest["bytes_up_total"]
    md = (out / "sweep.md").read_text()
    assert "| heterofl | 1/1 | dense |" in md and "| smallest | 1/1 | width=0.5 |" in md
    assert "step_ms[orin]" in md and "wasted_device_s" in md
    assert (out / "sweep_accuracy.png").stat().st_size > 5000
    assert "sw-smallest" in (out / "configs" / "smallest-seed4.toml").read_text()


def test_campaign_run_with_seeds_writes_mean_and_spread(tmp_path, cgroups):  # noqa: F811
    path = campaign_file(tmp_path, "seeds", FLEET.replace('profile = "width=0.5"', 'profile = "dense"'),
                         strategy="fedavg", rounds=3)
    out = tmp_path / "seeds"
    proc = orchard("campaign", "run", str(path), "--seeds", "0,1", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seeds = [json.loads((out / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1)]
    assert [s["rounds"] for s in seeds] == [3, 3]
    stats = json.loads((out / "sweep.json").read_text())["stats"]["campaign"]
    finals = [s["final_accuracy"] for s in seeds]
    assert stats["final_accuracy"]["n"] == 2
    assert abs(stats["final_accuracy"]["mean"] - sum(finals) / 2) < 1e-9
    assert abs(stats["final_accuracy"]["sd"] - abs(finals[0] - finals[1]) / 2 ** 0.5) < 1e-9
    assert " ± " in (out / "sweep.md").read_text()
    band = json.loads((out / "sweep.json").read_text())["bands"]["campaign"]
    assert len(band["t_s"]) == len(band["mean"]) and band["mean"][-1] is not None
