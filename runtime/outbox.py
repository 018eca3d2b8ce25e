"""The device's outbox: each sealed update frame, from the end of training until the server's
receipt for it (issue 15, part 3: nothing lost).

A broker PUBACK only says the broker has the message; a broker that dies before forwarding it,
or a server that is down, loses it. So an update leaves the outbox only when the server's sealed
`Receipt` for its task comes (accepted or refused: either way sending it again would not help).
Until then it is sent again whenever the server is back (the agent sends every `task_ids()` when it sees
the server's state online after a reconnect) and, with no reconnect at all, after `resend_after_s`,
doubling up to 32x. Every send gets a new chunk msg_id: a receiver ignores the chunks of a frame
it completed, and the server answers a copy it has already judged with the same receipt, so a
re-send is counted once.

The agent's outbox holds each update frame unsealed and seals it as it chunks it
(`chunks.chunk_sealed`, the same bytes every send): the MAC is computed chunk by chunk while the
chunks before go out, and no second, sealed copy of a 10 MB frame is held until the receipt.

Board code: standard library and runtime only, Python 3.8 compatible.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Callable

from runtime.chunks import DEFAULT_CHUNK_BYTES, chunk_frame
from runtime.protocol import Receipt
from runtime.record import record

RESEND_AFTER_S = 120.0
MAX_BACKOFF_DOUBLINGS = 5


# (frame, msg_id, chunk bytes) -> its chunks; the agent's seals the frame as it chunks it.
Chunker = typing.Callable[[bytes, str, int], typing.Iterable[bytes]]  # typing's: board Pythons from 3.8


@record(frozen=False)
class _Pending:
    frame: bytes
    sends: int = 0
    next_send_s: float = 0.0


class Outbox:
    def __init__(self, publish: Callable[[bytes], object], resend_after_s: float = RESEND_AFTER_S,
                 clock: Callable[[], float] = time.monotonic, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 chunks: Chunker = chunk_frame) -> None:
        self._publish = publish  # one chunk onto the device's update topic
        self._chunks = chunks
        self.chunk_bytes = chunk_bytes
        self.resend_after_s = resend_after_s
        self._clock = clock
        self._pending: dict[str, _Pending] = {}

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def sends(self, task_id: str) -> int:
        return self._pending[task_id].sends

    def add(self, task_id: str, frame: bytes) -> None:
        self._pending[task_id] = _Pending(frame)

    def send(self, task_id: str) -> None:
        """Publish the update once more, under a new msg_id. Raises what `publish` raises."""
        out = self._pending[task_id]
        out.sends += 1
        out.next_send_s = self._clock() + self.resend_after_s * 2 ** min(out.sends - 1, MAX_BACKOFF_DOUBLINGS)
        msg_id = f"{task_id}.{out.sends}.{int(time.time() * 1000) % 10**9}"
        for chunk in self._chunks(out.frame, msg_id, self.chunk_bytes):
            self._publish(chunk)

    def task_ids(self) -> list[str]:
        """What still waits for a receipt, oldest first."""
        return list(self._pending)

    def send_due(self) -> list[str]:
        """Send again what was sent before and has waited its backoff for a receipt."""
        now = self._clock()
        due = [t for t, out in self._pending.items() if out.sends and now >= out.next_send_s]
        for task_id in due:
            self.send(task_id)
        return due

    def settle(self, receipt: Receipt) -> bool:
        """Drop the update the receipt is for; False if nothing was waiting (a second receipt)."""
        return self._pending.pop(receipt.task_id, None) is not None
