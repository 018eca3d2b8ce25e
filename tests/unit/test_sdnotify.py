"""sd_notify over a real AF_UNIX datagram socket, as systemd listens on $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from runtime.sdnotify import SdNotify


@pytest.fixture
def listener(tmp_path: Path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()


def _drain(sock: socket.socket) -> list[str]:
    out = []
    sock.settimeout(0.05)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except OSError:
        return out


def test_ready_watchdog_at_half_the_interval_and_stopping(listener) -> None:
    path, sock = listener
    now = [100.0]
    n = SdNotify.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
    n._clock = lambda: now[0]
    assert n.enabled and n.watchdog_s == 4.0
    n.ready("connected")
    assert sock.recv(4096).decode() == "READY=1\nSTATUS=connected"
    for t in (100.5, 101.0, 101.9):  # within half the interval: no ping
        now[0] = t
        n.tick()
    assert _drain(sock) == []
    now[0] = 102.0
    n.tick()
    now[0] = 102.1
    n.tick()
    assert _drain(sock) == ["WATCHDOG=1"]
    n.stopping()
    assert _drain(sock) == ["STOPPING=1"]


def test_no_socket_is_a_no_op_and_a_child_with_the_agents_env_never_pings(listener) -> None:
    path, sock = listener
    off = SdNotify.from_env({})
    assert not off.enabled and not off.send("READY=1")
    child = SdNotify.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert child.watchdog_s is None  # WATCHDOG_PID names another process
    child.tick()
    assert _drain(sock) == []


def test_a_vanished_socket_is_logged_once_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = SdNotify(str(tmp_path / "gone"), 1.0)
    assert not n.send("WATCHDOG=1") and not n.send("WATCHDOG=1")
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1


def test_abstract_namespace_address() -> None:
    name = f"orchard-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        assert SdNotify("@" + name, None).send("READY=1")
        assert sock.recv(64) == b"READY=1"
    finally:
        sock.close()
