"""Report figures broken down by what was trained: bytes per round, the loss curve, accuracy per
profile and per tier, the served model, energy to target; on hand-written runs with known answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testbed import breakdown
from testbed.report import write_report
from testbed.run_data import load_run
from tests.unit.test_report import CONFIG, EVENTS, FLEET, ev, make_run

# Frames and scores the server logs around the known run of test_report: a gets its artifact and
# two tasks, b one task; a's two updates and b's refused one come back.
EXTRA = [
    ev(2, "artifact_sent", device="a", key="k", bytes=5000),
    ev(2, "task_frame", device="a", task_id="t1", bytes=1000),
    ev(2, "task_frame", device="b", task_id="t2", bytes=400),
    ev(4.4, "update_received", device="a", task_id="t1", bytes=900, step_ms_median=12.0, loss_last=0.8),
    ev(5, "evaluate_profile", version=1, profile="width=0.5", accuracy=0.3, loss=1.9),
    ev(5, "task_frame", device="a", task_id="t3", bytes=1000),
    ev(8.4, "update_received", device="a", task_id="t3", bytes=950, step_ms_median=14.0, loss_last=0.6),
    ev(9, "evaluate_profile", version=2, profile="width=0.5", accuracy=0.55, loss=1.2),
    ev(10.9, "update_received", device="b", bytes=300),  # undecodable: no task id, bytes still count
]


def run_with(tmp_path: Path, events: list[dict[str, Any]], fleet: dict[str, Any] = FLEET,
             config: str = CONFIG) -> Path:
    run = make_run(tmp_path, fleet=fleet, config=config)
    ordered = sorted(events, key=lambda e: e["wall_t"])
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ordered))
    return run


def test_bytes_loss_and_profile_accuracy_per_round(tmp_path: Path) -> None:
    s = write_report(run_with(tmp_path, EVENTS + EXTRA))
    r1, r2 = s["per_round"]
    assert (r1["bytes_down"], r1["bytes_up"]) == (6400, 900)
    assert (r2["bytes_down"], r2["bytes_up"]) == (1000, 950)
    assert (s["bytes_down_total"], s["bytes_up_total"]) == (7400, 2150)  # b's 300 came after the last round
    assert (r1["loss"], r1["train_loss"], r2["loss"], r2["train_loss"]) == (1.5, 0.8, 1.0, 0.6)
    assert (r1["accuracy[width=0.5]"], r2["accuracy[width=0.5]"]) == (0.3, 0.55)
    assert s["accuracy_per_profile"] == {"dense": 0.6, "width=0.5": 0.55}
    # a trains dense, so the run serves the global model: the headline figures are unchanged.
    assert (s["served_profile"], s["final_accuracy"], s["time_to_target_s"]) == ("dense", 0.6, 9.0)
    # Energy to target (9 s): a 40 J; b (8 J at 5 s, 10 J at 7 s, then +1 J restarted) 10 + 2/3.
    assert s["energy_to_target_j"] == round(40 + 10 + 2 / 3, 3)
    for name in ("loss", "bytes"):
        assert (tmp_path / "known" / "plots" / f"{name}.png").stat().st_size > 5000


def test_tiers_name_board_profile_accuracy_and_resources(tmp_path: Path) -> None:
    fleet = {**FLEET, "devices": [{**FLEET["devices"][0], "group": "pi4"}, {**FLEET["devices"][1], "group": "nano"}]}
    s = write_report(run_with(tmp_path, EVENTS + EXTRA, fleet, CONFIG + "[train]\nlocal_steps = 4\n"))
    pi4, nano = s["groups"]
    # a's tasks: 2 s and 3 s of training for 4 steps each, so 500 and 750 ms per step.
    assert pi4 == {"group": "pi4", "board": "rpi4b-4gb", "devices": 1, "profiles": ["dense"], "accuracy": 0.6,
                   "updates": 2, "train_s": 5.0, "energy_j": 50.0, "peak_rss_mb": 150.0, "step_ms_median": 13.0,
                   "task_step_ms_median": 625.0}
    assert nano == {**nano, "group": "nano", "board": "jetson-nano", "profiles": ["width=0.5"], "accuracy": 0.55,
                    "updates": 0, "step_ms_median": None, "peak_rss_mb": 260.0}
    page = (tmp_path / "known" / "report.html").read_text()
    assert "Tiers ([[fleet]] groups)" in page and "Accuracy per profile" in page


def test_a_fleet_of_submodels_serves_its_widest_submodel(tmp_path: Path) -> None:
    # Every device trains a leading-width submodel: the untrained rest of the global model is not
    # what the run produced, so the headline accuracy is the widest submodel's.
    narrowed = [{**e, "profile": "width=0.5"} if e["event"] == "task_sent" else e for e in EVENTS + EXTRA]
    fleet = {**FLEET, "devices": [{**d, "profile": "width=0.5"} for d in FLEET["devices"]]}
    run = run_with(tmp_path, narrowed, fleet)
    data = load_run(run)
    assert breakdown.served_profile(data) == "width=0.5"
    assert breakdown.served_curve(data) == [(5.0, 1, 0.3), (9.0, 2, 0.55)]
    s = write_report(run)
    assert (s["final_accuracy"], s["best_accuracy"], s["time_to_target_s"]) == (0.55, 0.55, 9.0)


def test_rolling_windows_and_class_subsets_serve_the_global_model(tmp_path: Path) -> None:
    for profile in ("width=0.5,window=rolling", "classes=0-4"):
        events = [{**e, "profile": profile} if e["event"] == "task_sent" else e for e in EVENTS]
        data = load_run(run_with(tmp_path / profile.replace("=", "_"), events))
        assert breakdown.served_profile(data) == "dense", profile


def test_no_target_no_energy_to_target(tmp_path: Path) -> None:
    run = make_run(tmp_path, config='[campaign]\nname = "known"\n')
    s = write_report(run)
    assert (s["time_to_target_s"], s["energy_to_target_j"]) == (None, None)
    assert (s["bytes_up_total"], s["bytes_down_total"]) == (0, 0)  # a run from before frames were logged
