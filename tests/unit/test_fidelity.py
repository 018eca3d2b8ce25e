"""The delivered-CPU check, on a hand-written run folder with known
answers, and what the report shows for them (dilation line, red flags)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from testbed.fidelity import DELIVERED_MIN, check, delivered_cpu
from testbed.report import write_report
from tests.unit.test_report import FLEET, ev, make_run


def upd(device: str, train_s: float, cpu_s: float | None, quota: float | None, steps: int = 10) -> dict[str, Any]:
    metrics: dict[str, Any] = {"steps": steps, "loss_last": 0.1}
    if cpu_s is not None:
        metrics["cpu_s"] = cpu_s
    if quota is not None:
        metrics["cpu_quota_cores"] = quota
    return {"event": "update_accepted", "device": device, "train_s": train_s, "metrics": metrics}


def test_delivered_cpu_is_cpu_over_wall_time_times_quota() -> None:
    updates = [upd("a", 1.0, 0.25, 0.1), upd("a", 1.0, 0.25, 0.1),  # board 1 s = 2.5 wall s at dilation 2.5
               upd("b", 2.0, 0.5, 0.2),  # 0.5 / (5 wall s x min(0.2, 1 thread)) = 0.5
               upd("c", 1.0, None, None),  # unthrottled: nothing to compare with
               upd("d", 1.0, 2.5, 4.0)]  # quota 4 cores on 1 thread: owed 1 core, not 4
    got = delivered_cpu(updates, dilation=2.5, threads={"a": 1, "b": 1, "d": 1})
    assert got["a"] == {"tasks": 2, "cpu_s": 0.5, "owed_cpu_s": 0.5, "ratio": 1.0}
    assert got["b"]["ratio"] == pytest.approx(0.5) and "c" not in got and got["d"]["ratio"] == pytest.approx(1.0)


def test_report_names_a_device_that_got_too_little_cpu(tmp_path: Path) -> None:
    fleet = {**FLEET, "time_dilation": 2.0, "host_speed_factor": 5.1, "host_speed_source": "cache",
             "dilation": {"factor": 2.0, "text": "time dilation 2.0×: the fleet needs 3.00 cores"},
             "dilation_warning": None,
             "devices": [{**d, "threads": 1} for d in FLEET["devices"]]}
    run = make_run(tmp_path, fleet=fleet)
    extra = [ev(4.6, "update_accepted", device="a", task_id="x1", staleness=0, n_samples=1, train_s=1.0,
                metrics={"cpu_s": 2.0, "cpu_quota_cores": 1.0, "steps": 10}),  # 2.0 of 2.0 CPU s
             ev(4.7, "update_accepted", device="b", task_id="x2", staleness=0, n_samples=1, train_s=1.0,
                metrics={"cpu_s": 0.6, "cpu_quota_cores": 0.5, "steps": 10})]  # 0.6 of 1.0 CPU s
    with (run / "events.jsonl").open("a") as f:
        f.writelines(json.dumps(e) + "\n" for e in extra)
    summary = write_report(run)
    assert check(run, fleet)["underdelivered"] == ["b"] and DELIVERED_MIN == 0.9
    by_id = {d["id"]: d for d in summary["devices"]}
    assert (by_id["a"]["cpu_delivered"], by_id["b"]["cpu_delivered"]) == (1.0, 0.6)
    assert summary["time_dilation"] == 2.0 and summary["host_speed_source"] == "cache"
    html = (run / "report.html").read_text()
    assert "time dilation 2.0×" in html
    assert "<p class='warn'>⚠ CPU NOT DELIVERED: b got 60% of its CPU quota" in html
    assert "CPU OVERSUBSCRIBED" not in html
    # dilation "off" on an oversubscribed host: the warning is shown in red.
    fleet["dilation_warning"] = "CPU OVERSUBSCRIBED: the fleet's quotas add up to 3.00 cores"
    (run / "fleet.json").write_text(json.dumps(fleet))
    write_report(run)
    assert "<p class='warn'>⚠ CPU OVERSUBSCRIBED" in (run / "report.html").read_text()
