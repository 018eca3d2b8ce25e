"""`orchard mpsl run` end to end: compute-node and owner processes in cgroups, the aggregator here.
Parallel SL with per-epoch FedAvg is FedAvg (each owner's chain of copies is its own model), so the
assembled model must score exactly like the FedAvg baseline's on the same data and batches."""

from __future__ import annotations

import pytest

from models.mpsl_plan import profile
from models.structure import full_structure
from testbed.mpsl_run import RunSpec, run

pytestmark = [pytest.mark.integration]

SMALL = {"dataset": "digits", "owners": 2, "samples_per_owner": 32, "batch": 8, "epochs": 2, "test_samples": 100,
         "lr": 0.05}


def test_two_hop_run_equals_fedavg_and_reports_every_figure(tmp_path):
    artifact_cache_dir = tmp_path / "cache"
    layers = profile(full_structure("cnn", (1, 8, 8), 10), 8, artifact_cache_dir, repeats=1)
    split = run(RunSpec(mode="mpsl", nodes=2, **SMALL), layers, tmp_path / "mpsl", artifact_cache_dir)
    fed = run(RunSpec(mode="fedavg", **SMALL), layers, tmp_path / "fedavg", artifact_cache_dir)
    assert [e["epoch"] for e in split["epochs"]] == [0, 1]
    for a, b in zip(split["epochs"], fed["epochs"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.011)  # one test sample of 100 may flip
    assert len(split["node_peak_rss_mb"]) == 2 and all(m > 10 for m in split["node_peak_rss_mb"])
    assert split["estimate_s"]["t_tot"] > 0 and all(e["epoch_s"] > 0 for e in split["epochs"])
    assert split["stages"] and len(split["cuts"]) == 3


def test_a_node_killed_mid_epoch_falls_back_to_fedavg_and_loses_nothing(tmp_path):
    cache = tmp_path / "cache"
    layers = profile(full_structure("cnn", (1, 8, 8), 10), 8, cache, repeats=1)
    hit = run(RunSpec(mode="mpsl", nodes=2, kill_node_at_epoch=1, timeout_s=5.0, **SMALL), layers,
              tmp_path / "kill", cache)
    fed = run(RunSpec(mode="fedavg", **SMALL), layers, tmp_path / "fedavg", cache)
    rows = hit["epochs"]
    assert [r.get("mode", "failed") for r in rows] == ["mpsl", "failed", "fedavg"]
    assert "compute node" in rows[1]["failed"][0] and rows[1]["fallback"] == "fedavg"
    # The failed epoch left the global model as it was: the retried epoch lands where FedAvg does.
    assert rows[2]["loss"] == pytest.approx(fed["epochs"][1]["loss"], abs=1e-4)
