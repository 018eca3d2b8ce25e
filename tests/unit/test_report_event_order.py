"""events.jsonl order: an engine event carries its exact clock, a service-written one `t` rounded
to the millisecond; within that millisecond the writer's order must stand (received, then
accepted), or the report loses the update's step time."""

from __future__ import annotations

import json
from pathlib import Path

from testbed.run_data import _read_events


def test_events_within_a_millisecond_keep_the_writers_order(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    rows = [{"event": "update_received", "device": "orin-0", "task_id": "t1", "step_ms_median": 0.09, "t": 1.638},
            {"event": "update_accepted", "device": "orin-0", "task_id": "t1", "t": 1.6377118},
            {"event": "aggregate", "t": 1.7}, {"event": "task_sent", "t": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    order = [e["event"] for e in _read_events(path, [])]
    assert order == ["task_sent", "update_received", "update_accepted", "aggregate"]
