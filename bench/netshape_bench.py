"""Network shaping: do board-second transfer times hold under time dilation?

One shaped endpoint per dilation (1, 2, 4) with a cap of 8 board Mbit/s each way; 1 MB sent from
the namespace to the bridge over TCP, timed at the receiver from its first byte to EOF. Board
seconds = wall / dilation; the cap (TCP goodput) says 1.000 s. Needs root (real namespaces).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from typing import Any

from testbed import netns
from testbed.links import tbf_figures

CAP_MBIT = 8.0
PAYLOAD_BYTES = 1_000_000
REPEATS = 3
SEND = ("import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30); "
        "s.sendall(b'x' * int(sys.argv[3])); s.close()")


def _transfer_wall_s(net: netns.Network, ep: netns.Endpoint) -> float:
    srv = socket.socket()
    srv.bind((net.bridge_ip, 0))
    srv.listen(1)
    out: dict[str, float] = {}

    def receive() -> None:
        conn, _ = srv.accept()
        t0 = None
        while conn.recv(1 << 16):
            t0 = t0 or time.monotonic()
        out["s"] = time.monotonic() - (t0 or time.monotonic())
        conn.close()

    th = threading.Thread(target=receive)
    th.start()
    subprocess.run([sys.executable, "-c", SEND, net.bridge_ip, str(srv.getsockname()[1]), str(PAYLOAD_BYTES)],
                   preexec_fn=ep.enter, check=True, timeout=60)
    th.join(60)
    srv.close()
    return out["s"]


def run() -> dict[str, Any]:
    support = netns.probe_support()
    if not (support.netns and support.tbf):
        return {"skipped": support.describe()}
    rows = []
    with netns.Network.open() as net:
        for i, dilation in enumerate((1.0, 2.0, 4.0)):
            f = tbf_figures(CAP_MBIT, dilation)
            ep = net.add(f"bench-{i}", f.rate_bit, f.rate_bit, up_args=f.args(), down_args=f.args())
            board_s = [_transfer_wall_s(net, ep) / dilation for _ in range(REPEATS)]
            rows.append({"dilation": dilation, "tc_rate_bit": f.rate_bit, "board_s": [round(s, 3) for s in board_s],
                         "expected_board_s": round(8 * PAYLOAD_BYTES / (CAP_MBIT * 1e6), 3)})
    return {"cap_mbit": CAP_MBIT, "payload_bytes": PAYLOAD_BYTES, "support": support.describe(), "rows": rows}
