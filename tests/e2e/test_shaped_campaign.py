"""A campaign with shaped devices end to end: real namespaces, veths, tbf, broker on the bridge.
Needs root (ORCHARD_REQUIRE_NETNS=1 in CI makes a skip a failure)."""

from __future__ import annotations

import json

import pytest

from testbed import netns
from tests.conftest import require_or_skip
from tests.e2e.test_campaign import campaign_file, orchard, orchard_cgroups_left, processes_of

WALK = '{ kind = "random_walk", step_s = 1, sigma = 0.3, min = 0.3, max = 1.0 }'
SHAPED = """
[[fleet]]
name = "slow"
board = "rpi5"
count = 1
link = { kind = "custom", up_mbit = 2.0, down_mbit = 8.0, trace = WALK }
[[fleet]]
name = "wired"
board = "jetson-orin-nano"
count = 1
link = { kind = "ethernet" }
[[fleet]]
name = "host"
board = "rpi5"
count = 1
""".replace("WALK", WALK)


@pytest.fixture
def shaping() -> netns.NetSupport:
    s = netns.probe_support()
    require_or_skip("ORCHARD_REQUIRE_NETNS", s.netns and s.tbf, s.describe())
    return s


def test_shaped_devices_train_and_report_caps_and_bytes(tmp_path, shaping):
    # fedavg: every round waits for every device, so the 2 Mbit/s one must deliver updates.
    path = campaign_file(tmp_path, "shaped", SHAPED, strategy="fedavg", rounds=3, duration_board_s=120)
    run = tmp_path / "run"
    proc = orchard("campaign", "run", str(path), "--out", str(run), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "network shaping: namespaces + veth + tbf available" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    devices = {d["id"]: d for d in summary["devices"]}
    slow, wired, host = devices["slow-0"], devices["wired-0"], devices["host-0"]
    assert slow["updates"] >= 1 and wired["updates"] >= 1 and host["updates"] >= 1
    assert (slow["link_kind"], slow["link_up_mbit"], slow["link_down_mbit"]) == ("custom", 2.0, 8.0)
    assert (wired["link_kind"], wired["link_up_mbit"]) == ("ethernet", 940.0)
    assert "link_up_mbit" not in host  # unshaped: the host's namespace, loopback to the broker
    # Each shaped device's veth carried at least its model downloads and its updates.
    for d in (slow, wired):
        assert d["link_bytes_up"] > 10_000 and d["link_bytes_down"] > 10_000, d
    fleet = json.loads((run / "fleet.json").read_text())
    dilation = fleet["time_dilation"]
    link = next(d["link"] for d in fleet["devices"] if d["id"] == "slow-0")
    assert link["tc_up_bit"] == round(2.0e6 * 1514 / 1448 / dilation) and link["address"].startswith("198.1")
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "link_rate" and e["device"] == "slow-0"]
    assert steps and all(0.3 * 2.0 - 1e-6 <= e["up_mbit"] <= 2.0 for e in steps)
    assert "link_bytes_up" in (run / "report.html").read_text()
    slot = link["netns"].removeprefix(netns.NS_PREFIX).split("-")[0]
    assert not [n for n in netns.list_namespaces() if n.startswith(f"{netns.NS_PREFIX}{slot}-")]
    assert not [n for n in netns.list_links() if n in (f"orbr{slot}",) or n.startswith(f"orh{slot}x")]
    assert not [q for q in netns.list_qdiscs() if f"orh{slot}x" in q]
    assert orchard_cgroups_left("shaped") == [] and processes_of(run) == []


def test_netem_asked_for_on_a_kernel_without_it_is_one_line(tmp_path, shaping):
    if shaping.netem:
        pytest.skip("this kernel has netem")
    fleet = '[[fleet]]\nname = "x"\nboard = "rpi5"\nlink = { up_mbit = 1, down_mbit = 1, delay_ms = 40 }\n'
    proc = orchard("campaign", "run", str(campaign_file(tmp_path, "netem", fleet)), "--out", str(tmp_path / "run"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "netem" in lines[0] and "delay_ms" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
