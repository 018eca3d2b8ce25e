"""The report's wasted work and never-joined devices, on test_report.py's hand-written run."""

from __future__ import annotations

import json
from pathlib import Path

from testbed.report import write_report
from tests.unit.test_report import FLEET, make_run


def test_wasted_work_of_the_known_run(tmp_path: Path) -> None:
    s = write_report(make_run(tmp_path))
    work = s["wasted_work"]
    # a: t1 2 -> 4.5 and t3 5 -> 8.5, both accepted. b: t2 2 -> 11, refused, offline 6 -> 10.
    assert work["devices"]["a"] == {"wasted_s": 0.0, "useful_s": 6.0, "unfinished_s": 0.0, "tasks_wasted": 0,
                                    "wasted_energy_j": 0.0}
    assert work["devices"]["b"] == {"wasted_s": 5.0, "useful_s": 0.0, "unfinished_s": 0.0, "tasks_wasted": 1,
                                    "wasted_energy_j": 0.0}  # its refusal carried no energy figure
    assert (work["wasted_s"], work["useful_s"], work["wasted_fraction"]) == (5.0, 6.0, round(5 / 11, 4))
    assert s["never_joined"] == []
    page = (tmp_path / "known" / "report.html").read_text()
    assert "Wasted work" in page and "45.5 %" in page and "Devices that never joined" not in page


def test_a_device_that_never_said_hello_is_named_with_its_reason(tmp_path: Path) -> None:
    fleet = {**FLEET, "devices": [*FLEET["devices"], {"id": "c", "board": "rpi5", "group": "g"}]}
    run = make_run(tmp_path, fleet=fleet)
    with (run / "events.jsonl").open("a") as f:
        exit_line = {"event": "device_exit", "device": "c", "code": 2, "t": 3.0, "wall_t": 1_700_000_003.0}
        f.write(json.dumps(exit_line) + "\n")
    (run / "logs").mkdir()
    (run / "logs" / "c.log").write_text("starting\nerror: shard c.npz: no such file\n\n")
    s = write_report(run)
    assert s["never_joined"] == [{"id": "c", "reason": "its agent exited 1 time(s), last with code 2; "
                                                     "last log line: 'error: shard c.npz: no such file'"}]
    assert "Devices that never joined" in (run / "report.html").read_text()
    assert json.loads((run / "summary.json").read_text())["never_joined"][0]["id"] == "c"
