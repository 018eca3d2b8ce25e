"""The device's outbox (runtime/outbox.py): an update goes only when its receipt comes; every
send is a new chunk msg_id; re-sends back off, doubling."""

from __future__ import annotations

import os

from runtime.chunks import Reassembler
from runtime.outbox import Outbox
from runtime.protocol import Receipt


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_an_update_stays_until_its_receipt_and_each_send_reassembles_anew() -> None:
    sent: list[bytes] = []
    clock = Clock()
    box = Outbox(sent.append, resend_after_s=10.0, clock=clock)
    frame = os.urandom(600 * 1024)  # three chunks
    box.add("t1", frame)
    box.add("t2", b"small")
    box.send("t1")
    box.send("t1")  # the first copy's receipt was lost, say
    server = Reassembler(timeout_s=60, max_bytes=1 << 24, clock=lambda: 0.0)
    frames = [f for f in (server.feed("dev0", c) for c in sent) if f is not None]
    assert frames == [frame, frame]  # the second send is not swallowed as a finished msg_id
    assert box.task_ids() == ["t1", "t2"] and box.sends("t1") == 2
    assert box.settle(Receipt("dev0", "t1", accepted=False, reason="too stale")) is True  # refused: gone too
    assert box.settle(Receipt("dev0", "t1", accepted=True)) is False  # a second receipt: nothing left
    assert box.task_ids() == ["t2"] and "t1" not in box and len(box) == 1


def test_resends_back_off_and_only_what_was_sent_is_due() -> None:
    sent: list[bytes] = []
    clock = Clock()
    box = Outbox(sent.append, resend_after_s=10.0, clock=clock)
    box.add("never-sent", b"a")  # waits for the server; the timer does not send it
    box.add("t1", b"b")
    box.send("t1")
    clock.t = 9.9
    assert box.send_due() == []
    clock.t = 10.0
    assert box.send_due() == ["t1"]  # next after 20 s more
    clock.t = 29.9
    assert box.send_due() == []
    clock.t = 30.0
    assert box.send_due() == ["t1"] and box.sends("t1") == 3
    for _ in range(10):  # the backoff stops doubling at 32x
        clock.t += 10.0 * 32
        assert box.send_due() == ["t1"]
    assert box.sends("never-sent") == 0
