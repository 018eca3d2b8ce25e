"""The compute node's queue policy (methods.md §4.3), on an injected clock."""

from __future__ import annotations

from runtime.split_queue import EdfQueue


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_policy_order_immediate_then_most_overdue_then_soonest_within_horizon():
    clock = Clock()
    q: EdfQueue[str] = EdfQueue(clock, horizon_s=0.1)
    q.put("late-1s", 99.0)
    q.put("late-3s", 97.0)
    q.put("due-in-50ms", 100.05)
    q.put("due-in-20ms", 100.02)
    q.put("due-in-5s", 105.0)
    q.put("now-a", None)
    q.put("now-b", None)
    assert [q.pick() for _ in range(6)] == ["now-a", "now-b", "late-3s", "late-1s", "due-in-20ms", "due-in-50ms"]
    assert q.pick() is None  # 5 s off: case 4, wait
    clock.t = 104.95
    assert q.pick() == "due-in-5s"


def test_ready_predicate_holds_tasks_back():
    q: EdfQueue[int] = EdfQueue(Clock())
    q.put(1, None)
    q.put(2, 50.0)
    assert q.pick(lambda x: x != 1) == 2
    assert q.get(0.01, lambda x: x != 1) is None
    assert q.pick() == 1 and len(q) == 0
