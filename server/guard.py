"""Per-sender bounds for the server's MQTT side: token-bucket rate limits, with a bounded table of
senders, so no id (real, spoofed or made up) can make the server do or store unbounded work."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

# How often a device may say hello (it does on every connect and reconnect) and how many
# artifact frames it may be sent (each hello says which it lacks, so a lying device could have
# every artifact re-sent with every task: 200 small hellos made the server publish 37.7 MB).
HELLO_BURST, HELLO_PER_S = 10, 1 / 2  # a device re-sends hello on every reconnect
ARTIFACT_BURST, ARTIFACT_PER_S = 12, 1 / 10
# Rejections of the same kind from the same sender are logged a few times, then counted: a flood
# of bad messages must not become a flood of events.jsonl lines.
REJECT_LOG_BURST, REJECT_LOG_PER_S = 20, 1 / 2  # per sender and kind
REJECT_LOG_ALL_BURST, REJECT_LOG_ALL_PER_S = 100, 10  # per kind over all senders (made-up ids are many)
HELLO_MAX_BYTES = 32 * 1024  # a hello lists a few profiles and artifact keys; 1 MiB ones bloated checkpoints
MAX_TRACKED_IDS = 4096


class TokenBuckets:
    """`allow(key)` spends a token of `key`'s bucket (`burst` tokens, refilled at `per_s` a
    second). At most `max_ids` keys are tracked, least recently used dropped first (a dropped key
    starts over with a full bucket: the table's memory is what is bounded)."""

    def __init__(self, burst: float, per_s: float, *, clock: Callable[[], float] = time.monotonic,
                 max_ids: int = MAX_TRACKED_IDS) -> None:
        self.burst, self.per_s, self.max_ids = float(burst), float(per_s), max_ids
        self._clock = clock
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def allow(self, key: Hashable) -> bool:
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.per_s)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > self.max_ids:
            self._buckets.popitem(last=False)
        return ok

    def __len__(self) -> int:
        return len(self._buckets)


class RejectLog:
    """Which refused messages get an events.jsonl line: a few per sender and kind, and a few per
    kind over all senders, then they are counted; the next logged line of that kind carries the
    count (`suppressed_before`)."""

    def __init__(self) -> None:
        self._per_sender = TokenBuckets(REJECT_LOG_BURST, REJECT_LOG_PER_S)
        self._per_kind = TokenBuckets(REJECT_LOG_ALL_BURST, REJECT_LOG_ALL_PER_S)
        self.suppressed: dict[str, int] = {}

    def admit(self, kind: str, device_id: str | None) -> dict[str, int] | None:
        """Extra fields for the line to log, or None: do not log this one."""
        if not (self._per_sender.allow((device_id, kind)) and self._per_kind.allow(kind)):
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return None
        return {"suppressed_before": self.suppressed.pop(kind)} if kind in self.suppressed else {}
