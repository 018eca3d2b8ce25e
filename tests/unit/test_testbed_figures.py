"""The testbed bench's delivered-CPU and between-task figures (bench/testbed_figures.py): their
arithmetic on a synthetic device whose cgroup gets exactly its quota while it trains and nothing
while it waits for its next task. Until stop 21 the spans ran between telemetry rows, so the
wait counted as CPU owed; an idle device is not short of CPU."""

from __future__ import annotations

import pytest

from bench.testbed_figures import between_tasks, delivered, receipt_to_task_wall_s, status_spans

QUOTA = 0.012
T0 = 1_000_000.0  # a unix time: device_t and the usage samples share the host's clock


def _status(t: float, state: str, device: str = "pi4-0") -> dict[str, object]:
    return {"event": "device_status", "device": device, "state": state, "device_t": T0 + t, "wall_t": T0 + t + 0.01}


# trains 0-10 s, uploads 10-10.1, waits 10.1-12, trains 12-20, then idle
EVENTS = [_status(0, "training"), _status(10, "uploading"), _status(10.1, "idle"), _status(12, "training"),
          _status(20, "uploading"), _status(20.05, "idle"), _status(25, "idle")]


def _usage() -> list[tuple[float, float]]:
    """Cumulative cgroup CPU sampled every 0.5 s: quota x time while training, flat otherwise."""
    out, cpu = [], 0.0
    for i in range(0, 51):
        t = i * 0.5
        out.append((T0 + t, cpu))
        if t < 10 or 12 <= t < 20:
            cpu += QUOTA * 0.5
    return out


def test_delivered_counts_only_the_time_the_device_trained() -> None:
    spans = status_spans(EVENTS)["pi4-0"]
    training = [(a, b) for a, b, state in spans if state == "training"]
    assert training == [(T0, T0 + 10), (T0 + 12, T0 + 20)]
    got = delivered(training, _usage(), QUOTA)
    assert got is not None
    assert got["ratio"] == pytest.approx(1.0, abs=1e-4)
    assert got["owed_cpu_s"] == pytest.approx(QUOTA * 18, abs=1e-4)
    # The old definition's span, 9-13 s (two "training" rows a task end apart), owes the wait too:
    old = delivered([(T0 + 9, T0 + 13)], _usage(), QUOTA)
    assert old is not None and old["ratio"] == pytest.approx(0.5, abs=1e-4)


def test_between_tasks_is_the_wait_from_a_task_end_to_the_next_training() -> None:
    gaps, share = between_tasks(status_spans(EVENTS)["pi4-0"])
    assert gaps == pytest.approx([2.0])
    assert share == pytest.approx(18 / 25)


def test_spans_without_usage_samples_are_left_out_and_the_last_status_has_no_end() -> None:
    spans = status_spans([_status(0, "training"), _status(30, "uploading"), _status(31, "training")])["pi4-0"]
    assert [s for *_, s in spans] == ["training", "uploading"]  # the last "training" has no end yet
    assert delivered([(T0 + 30, T0 + 40)], _usage(), QUOTA) is None  # past the last sample: nothing owed


def test_dispatch_is_receipt_to_the_next_task_frame_per_device() -> None:
    events = [{"event": kind, "device": device, "wall_t": t} for kind, device, t in (
        ("receipt_sent", "a", 5.0), ("task_frame", "b", 5.5), ("task_frame", "a", 6.25), ("task_frame", "a", 9.0))]
    assert receipt_to_task_wall_s(events) == [1.25]  # b had no receipt; a's second frame answers none
