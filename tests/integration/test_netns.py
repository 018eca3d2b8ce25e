"""Network shaping with real namespaces, veths and tbf: caps hold, traces change them in place,
and nothing is left behind, not even by a SIGKILLed owner. Needs root; ORCHARD_REQUIRE_NETNS=1
(CI) makes a host without them a failure instead of a skip."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runtime.errors import ConfigError
from testbed import netns
from testbed.links import tbf_figures
from tests.conftest import require_or_skip

ROOT = Path(__file__).resolve().parents[2]
SEND_S = 1.5

# The client side: runs inside the endpoint's namespace (preexec_fn=ep.enter), sends or receives.
CLIENT = """
import socket, sys, time
mode, host, port, send_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((host, port), timeout=10)
if mode == "send":
    data = b"x" * 65536
    end = time.monotonic() + send_s
    while time.monotonic() < end:
        s.sendall(data)
else:
    while s.recv(1 << 16):
        pass
s.close()
"""


@pytest.fixture
def support() -> netns.NetSupport:
    s = netns.probe_support()
    require_or_skip("ORCHARD_REQUIRE_NETNS", s.netns and s.tbf, s.describe())
    return s


def _shaped(net: netns.Network, name: str, up_mbit: float, down_mbit: float, dilation: float) -> netns.Endpoint:
    up, down = tbf_figures(up_mbit, dilation), tbf_figures(down_mbit, dilation)
    return net.add(name, up.rate_bit, down.rate_bit, up_args=up.args(), down_args=down.args())


def _measure(net: netns.Network, ep: netns.Endpoint, direction: str, cap_wall_mbit: float) -> float:
    """`_measure_once`, once more if the first came in more than 15 % short: on a host shared with
    other tenants a CPU-starved sender can fall short of any cap; it can never beat one, so an
    over-delivery is never retried."""
    first = _measure_once(net, ep, direction)
    return first if first >= 0.85 * cap_wall_mbit else max(first, _measure_once(net, ep, direction))


def _measure_once(net: netns.Network, ep: netns.Endpoint, direction: str) -> float:
    """Wall Mbit/s of one TCP stream through the endpoint's link: "up" = namespace -> bridge."""
    srv = socket.socket()
    srv.bind((net.bridge_ip, 0))
    srv.listen(1)
    got: dict[str, float] = {}

    def host_side() -> None:
        conn, _ = srv.accept()
        if direction == "up":
            n, t0 = 0, None
            while chunk := conn.recv(1 << 16):
                t0 = t0 or time.monotonic()
                n += len(chunk)
            got["mbit"] = n * 8 / (time.monotonic() - (t0 or 0)) / 1e6
        else:
            data, n, t0 = b"y" * 65536, 0, time.monotonic()
            while time.monotonic() - t0 < SEND_S:
                conn.sendall(data)
                n += len(data)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # returns when the client has read everything and closed
            got["mbit"] = n * 8 / (time.monotonic() - t0) / 1e6
        conn.close()

    th = threading.Thread(target=host_side)
    th.start()
    mode = "send" if direction == "up" else "recv"
    subprocess.run([sys.executable, "-c", CLIENT, mode, net.bridge_ip, str(srv.getsockname()[1]), str(SEND_S)],
                   preexec_fn=ep.enter, check=True, timeout=30)
    th.join(30)
    srv.close()
    return got["mbit"]


def test_caps_hold_within_15_percent_in_board_units(support):
    """8 Mbit/s up and 20 down of board time, dilation 2: the wire carries 4 and 10 wall Mbit/s,
    so board-second transfer times hold; both measured within ±15 %."""
    dilation = 2.0
    with netns.Network.open() as net:
        ep = _shaped(net, "dev-0", 8.0, 20.0, dilation)
        up_board = _measure(net, ep, "up", 8.0 / dilation) * dilation
        down_board = _measure(net, ep, "down", 20.0 / dilation) * dilation
        assert abs(up_board / 8.0 - 1) <= 0.15, f"uplink {up_board:.2f} board Mbit/s vs cap 8"
        assert abs(down_board / 20.0 - 1) <= 0.15, f"downlink {down_board:.2f} board Mbit/s vs cap 20"
        up_bytes, down_bytes = net.counters("dev-0")
        assert up_bytes > 8e6 / 8 / dilation and down_bytes > 20e6 / 8 / dilation  # ~1.5 s of each
        # A trace step: `tc qdisc change` halves the uplink in place.
        half = tbf_figures(4.0, dilation)
        net.change("dev-0", half.args(), tbf_figures(20.0, dilation).args())
        up_half = _measure(net, ep, "up", 4.0 / dilation) * dilation
        assert abs(up_half / 4.0 - 1) <= 0.15, f"uplink after change {up_half:.2f} board Mbit/s vs 4"
        print(f"\nboard Mbit/s at dilation {dilation:g}: up {up_board:.2f} (cap 8), down {down_board:.2f} (cap 20), "
              f"up after tc change {up_half:.2f} (cap 4)")


def test_endpoints_reach_each_other_through_the_bridge(support):
    with netns.Network.open() as net:
        a = _shaped(net, "node-a", 50.0, 50.0, 1.0)
        b = _shaped(net, "node-b", 50.0, 50.0, 1.0)
        code = ("import socket,sys; s=socket.socket(); s.bind((sys.argv[1],0)); s.listen(1); "
                "print(s.getsockname()[1], flush=True); c,_=s.accept(); c.sendall(c.recv(5)); c.close()")
        server = subprocess.Popen([sys.executable, "-c", code, b.address], stdout=subprocess.PIPE, text=True,
                                  preexec_fn=b.enter)
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        client = ("import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); "
                  "s.sendall(b'hello'); print(s.recv(5).decode())")
        out = subprocess.run([sys.executable, "-c", client, b.address, port], preexec_fn=a.enter,
                             capture_output=True, text=True, timeout=20)
        server.wait(10)
        assert out.stdout.strip() == "hello", out.stderr


def _of_slot(slot: int) -> tuple[list[str], list[str], list[str]]:
    """Namespaces, links and qdiscs of one slot (other runs on the host may own other slots)."""
    return ([n for n in netns.list_namespaces() if n.startswith(f"{netns.NS_PREFIX}{slot}-")],
            [n for n in netns.list_links() if re.fullmatch(rf"or(br{slot}|h{slot}x\d+)", n)],
            [q for q in netns.list_qdiscs() if f"{netns.NS_PREFIX}{slot}-" in q or re.search(rf"dev orh{slot}x", q)])


def test_close_and_crash_leave_nothing(support):
    with netns.Network.open() as net:
        _shaped(net, "dev-0", 5.0, 5.0, 1.0)
        slot = net.slot
        during = _of_slot(slot)
        assert len(during[0]) == 1 and len(during[1]) == 2 and len(during[2]) == 2, during
    assert _of_slot(slot) == ([], [], [])
    # A run SIGKILLed mid-way (no close, no atexit): the next Network's start-up sweep removes it.
    code = ("import time; from testbed import netns; from testbed.links import tbf_figures; "
            "net = netns.Network.open(); f = tbf_figures(5.0, 1.0); "
            "net.add('dev-0', f.rate_bit, f.rate_bit, up_args=f.args(), down_args=f.args()); "
            "print(net.slot, flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    slot = int(owner.stdout.readline())
    held = _of_slot(slot)
    assert len(held[0]) == 1 and len(held[1]) == 2 and len(held[2]) == 2, held
    owner.kill()
    owner.wait()
    assert slot in netns.sweep_stale()
    assert _of_slot(slot) == ([], [], [])
    assert not Path(netns.STATE_DIR, f"slot-{slot}").exists()


def test_netem_asked_for_where_absent_is_one_line(support):
    if support.netem:
        pytest.skip("this kernel has netem")
    with pytest.raises(ConfigError, match="netem"):
        netns.Network.open(netem=True)
