"""systemd's notify protocol, without a dependency: `READY=1`, `WATCHDOG=1`, `STOPPING=1` as
datagrams on the AF_UNIX socket named by $NOTIFY_SOCKET (sd_notify(3); a leading `@` is the
abstract namespace).

The unit runs the agent with `Type=notify` and `WatchdogSec=`: systemd marks it started once
the agent has connected and subscribed, and restarts it when its main loop stops pinging (a hung
agent, not only a dead one). Without $NOTIFY_SOCKET (a hand start, the testbed) every call is a
no-op. A failed send is logged once and never stops the agent: the watchdog then restarts it,
which is the right outcome for a board whose notify socket vanished.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, Mapping

log = logging.getLogger(__name__)


class SdNotify:
    def __init__(self, address: str | None, watchdog_s: float | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        self._clock = clock
        self._last_ping = -float("inf")
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> SdNotify:
        address = env.get("NOTIFY_SOCKET") or None
        watchdog_s: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process systemd expects pings from; a child that inherited the
        # environment (the trainer) must not ping on the agent's behalf.
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog_s = int(usec) / 1e6
        return cls(address, watchdog_s)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, message: str) -> bool:
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), socket.MSG_DONTWAIT, target)  # never stall the agent's loop
            return True
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify to %s failed: %s (the systemd watchdog will restart the agent)",
                            self.address, exc)
                self._warned = True
            return False

    def ready(self, status: str = "") -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))
        self._last_ping = self._clock()

    def tick(self) -> None:
        """Ping the watchdog at half its interval; cheap to call every loop iteration."""
        if self.watchdog_s is None:
            return
        now = self._clock()
        if now - self._last_ping >= self.watchdog_s / 2:
            self.send("WATCHDOG=1")
            self._last_ping = now

    def stopping(self) -> None:
        self.send("STOPPING=1")
