"""A compute node's task queue with MP-SL's EDF-like policy (methods.md §4.3, the authors'
`network_layer::check_new_task`).

Each task carries a target time, when it is due (None: serve at once, the authors' -1):
  1. a task with no target is served first (in arrival order);
  2. else the most overdue one (largest now - target);
  3. else the one closest to becoming due within `horizon_s` (100 ms in the authors' code);
  4. else wait.
A `ready` predicate lets the node hold back tasks that must not run yet (a next-epoch forward
before the node has averaged its per-owner copies of the current epoch).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class EdfQueue(Generic[T]):
    def __init__(self, clock: Callable[[], float] = time.time, horizon_s: float = 0.1) -> None:
        self._clock = clock
        self.horizon_s = horizon_s
        self._items: list[tuple[float | None, int, T]] = []
        self._seq = 0
        self._cond = threading.Condition()

    def put(self, item: T, target_s: float | None = None) -> None:
        with self._cond:
            self._items.append((target_s, self._seq, item))
            self._seq += 1
            self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def pick(self, ready: Callable[[T], bool] | None = None) -> T | None:
        """The task the policy serves now, removed from the queue, or None."""
        with self._cond:
            now = self._clock()
            cands = [(i, e) for i, e in enumerate(self._items) if ready is None or ready(e[2])]
            if not cands:
                return None
            immediate = [c for c in cands if c[1][0] is None]
            if immediate:
                best = min(immediate, key=lambda c: c[1][1])
            else:
                overdue = [c for c in cands if now >= c[1][0]]  # type: ignore[operator]
                if overdue:
                    best = max(overdue, key=lambda c: (now - c[1][0], -c[1][1]))  # type: ignore[operator]
                else:
                    soon = [c for c in cands if c[1][0] - now <= self.horizon_s]  # type: ignore[operator]
                    if not soon:
                        return None
                    best = min(soon, key=lambda c: c[1][0])  # type: ignore[arg-type,return-value]
            del self._items[best[0]]
            return best[1][2]

    def get(self, timeout_s: float, ready: Callable[[T], bool] | None = None) -> T | None:
        """Block until the policy serves a task, or `timeout_s` passes (None)."""
        deadline = time.monotonic() + timeout_s
        while True:
            item = self.pick(ready)
            if item is not None:
                return item
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with self._cond:
                self._cond.wait(min(left, self.horizon_s / 10))

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
