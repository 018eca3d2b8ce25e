"""The choices plot places each logged choice at task start + t_s / dilation, next to the CPU
trace, and refuses a run with no choices in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.errors import ConfigError
from testbed.choices_plot import plot_choices, read_choices


def _run(tmp_path: Path, report: dict) -> Path:
    events = [{"event": "cpu_quota", "device": "d0", "fraction": 1.0, "t": 0.5},
              {"event": "task_sent", "device": "d0", "task_id": "t1", "t": 10.0},
              {"event": "cpu_quota", "device": "d0", "fraction": 0.5, "t": 11.0},
              {"event": "update_accepted", "device": "d0", "task_id": "t1", "t": 14.0, "report": report}]
    (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    (tmp_path / "fleet.json").write_text(json.dumps({"time_dilation": 2.0}))
    return tmp_path


def test_choices_land_at_board_time_and_plot(tmp_path: Path) -> None:
    run = _run(tmp_path, {"choice.0.t_s": 0.0, "choice.0.vector": 3.0, "choice.0.reason": 4.0,
                          "choice.1.t_s": 4.0, "choice.1.vector": 1.0, "choice.1.reason": 1.0})
    choices, cpu = read_choices(run)
    assert choices == {"d0": [(10.0, 3, 4), (12.0, 1, 1)]}  # 4 wall s at dilation 2 = 2 board s
    assert cpu == {"d0": [(0.5, 1.0), (11.0, 0.5)]}
    assert plot_choices(run).stat().st_size > 1000


def test_a_run_without_choices_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no accepted update reports a choice"):
        plot_choices(_run(tmp_path, {"steps_width_1": 3.0}))
