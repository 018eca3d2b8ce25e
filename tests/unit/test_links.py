"""Link specs, board link figures and the dilation arithmetic of tc figures (testbed.links)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.board import load_board, parse_board
from runtime.errors import ConfigError
from testbed.links import LinkSpec, link_trace, netem_args, parse_link, tbf_figures
from testbed.shaping import check_links

ROOT = Path(__file__).resolve().parents[2]
RPI5 = load_board("rpi5")
ZERO = load_board("rpi-zero2w")


def test_board_kinds_take_the_board_figures_and_overrides_win():
    wifi = parse_link("c.toml", {"kind": "wifi"}, RPI5)
    assert (wifi.up_mbit, wifi.down_mbit) == dict((k, (u, d)) for k, u, d in RPI5.links)["wifi"]
    eth = parse_link("c.toml", {"kind": "ethernet", "down_mbit": 50}, RPI5)
    assert eth.down_mbit == 50.0 and eth.up_mbit == 940.0
    custom = parse_link("c.toml", {"up_mbit": 2, "down_mbit": 8.5}, RPI5)
    assert (custom.kind, custom.up_mbit, custom.down_mbit, custom.needs_netem) == ("custom", 2.0, 8.5, False)
    assert parse_link("c.toml", {"up_mbit": 1, "down_mbit": 1, "delay_ms": 40}, RPI5).needs_netem


def test_every_board_has_sourced_link_figures():
    for name in ("rpi5", "rpi4b-4gb", "rpi3b-plus", "rpi-zero2w", "jetson-nano", "jetson-orin-nano"):
        board = load_board(name)
        assert board.links and board.source("link"), name
        for _kind, up, down in board.links:
            assert 0 < up <= 1000 and 0 < down <= 1000


@pytest.mark.parametrize("raw, needle", [
    ({"up_mbit": -1, "down_mbit": 5}, "up_mbit = -1"),
    ({"up_mbit": 0, "down_mbit": 5}, "up_mbit = 0"),
    ({"up_mbit": 5, "down_mbit": float("nan")}, "down_mbit = nan"),
    ({"up_mbit": 5, "down_mbit": True}, "down_mbit = True"),
    ({"kind": "5g"}, "link kind '5g' is unknown"),
    ({"kind": "custom", "up_mbit": 5}, "needs down_mbit"),
    ({"up_mbit": 5, "down_mbit": 5, "jitter_ms": 3}, "jitter_ms"),
    ({"up_mbit": 5, "down_mbit": 5, "loss_pct": 101}, "loss_pct"),
    ({"up_mbit": 5, "down_mbit": 5, "trace": "fast"}, "trace must be an inline table"),
    ("wifi", "link must be an inline table"),
])
def test_bad_link_is_one_line_naming_the_value(raw, needle):
    with pytest.raises(ConfigError) as err:
        parse_link("c.toml: [[fleet]] 'x'", raw, RPI5)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_kind_the_board_lacks_is_refused():
    with pytest.raises(ConfigError, match="has no ethernet figures"):
        parse_link("c.toml", {"kind": "ethernet"}, ZERO)
    with pytest.raises(ConfigError, match="is no board"):
        parse_link("c.toml", {"kind": "wifi"}, None)
    assert parse_link("c.toml", {"up_mbit": 3, "down_mbit": 4}, None).down_mbit == 4.0  # a compute node


def test_tc_figures_scale_rates_by_dilation_and_keep_bytes():
    # 8 Mbit/s of board time at dilation 4: 2 Mbit/s on the wire, so 1 MB takes 1 board s either way.
    # tbf meters frames: the wire rate carries the cap as TCP goodput (1448 payload bytes per 1514).
    f1, f4 = tbf_figures(8.0, 1.0), tbf_figures(8.0, 4.0)
    goodput = 1448 / 1514
    assert f4.rate_bit * goodput == pytest.approx(2e6, rel=1e-6) and f1.rate_bit * goodput == pytest.approx(8e6, 1e-6)
    board_s = 1e6 * 8 / (f4.rate_bit * goodput) / 4.0
    assert board_s == pytest.approx(1e6 * 8 / 8e6)
    assert f4.limit_bytes == f1.limit_bytes  # a queue of Q bytes is Q bytes in either time base
    assert f4.burst_bytes >= f4.rate_bit / 8 * 0.01 and f4.burst_bytes >= 2 * 1514
    spec = LinkSpec("custom", 1.0, 1.0, delay_ms=40.0, loss_pct=0.5)
    assert netem_args(spec, 3.0) == ["delay", "120.000ms", "loss", "0.5%"]
    with pytest.raises(ConfigError):
        tbf_figures(0.0, 1.0)


def test_link_trace_takes_the_cpu_kinds_on_its_own_stream():
    walk = {"kind": "random_walk", "step_s": 1, "sigma": 0.3, "min": 0.2, "max": 1.0}
    spec = LinkSpec("custom", 4.0, 4.0, trace=walk)
    a = link_trace(spec, seed=3, base_dir=".", device="d", index=0).changes(50.0)
    from testbed.traces import make_cpu_trace
    cpu = make_cpu_trace(walk, seed=3, base_dir=".", device="d", index=0).changes(50.0)
    assert a != cpu and all(0.2 <= v <= 1.0 for _, v in a)
    assert link_trace(LinkSpec("custom", 1.0, 1.0), seed=0, base_dir=".", device="d", index=0).changes(9.0) == \
        [(0.0, 1.0)]
    with pytest.raises(ConfigError, match="value"):
        link_trace(LinkSpec("custom", 1.0, 1.0, trace={"kind": "constant", "value": 0}), seed=0, base_dir=".",
                   device="d", index=0)


def test_board_link_table_errors_name_the_table():
    text = (ROOT / "firmware_configs" / "rpi5.toml").read_text()
    import tomllib
    data = tomllib.loads(text)
    bad = {**data, "link": {"lora": {"up_mbit": 1, "down_mbit": 1}}}
    with pytest.raises(ConfigError, match=r"\[link.lora\] is unknown"):
        parse_board(bad, "rpi5.toml")
    bad = {**data, "link": {"wifi": {"up_mbit": -3, "down_mbit": 1}}}
    with pytest.raises(ConfigError, match="up_mbit"):
        parse_board(bad, "rpi5.toml")
    unsourced = {**data, "sources": {k: v for k, v in data["sources"].items() if k != "link"}}
    with pytest.raises(ConfigError, match="'link'"):
        parse_board(unsourced, "rpi5.toml")


def test_shaping_with_an_external_broker_is_refused():
    with pytest.raises(ConfigError, match="external broker"):
        check_links({"d-0": LinkSpec("custom", 1.0, 1.0)}, "mqtt://10.0.0.5:1883")
    assert check_links({}, "mqtt://10.0.0.5:1883") is None


def test_not_root_is_one_line_naming_the_uid(monkeypatch):
    # A real unprivileged run cannot start this interpreter (it lives under /root here), so the
    # uid is what is replaced; the probe and the campaign check above it are the real ones.
    from testbed import netns

    monkeypatch.setattr(netns, "_support", None)
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError) as err:
        check_links({"d-0": LinkSpec("custom", 1.0, 1.0)}, "amqtt")
    assert "need root" in str(err.value) and "uid 1000" in str(err.value) and "\n" not in str(err.value)


def test_a_link_too_slow_for_one_frame_is_warned_about():
    from testbed.shaping import RunLinks

    links = RunLinks({"slow-0": LinkSpec("custom", 0.1, 1.0), "fast-0": LinkSpec("custom", 50.0, 50.0)}, 3.0)
    # 1 MB at 0.1 Mbit/s / 3 = 240 wall s, against 60 s; at 50 Mbit/s it is 0.5 s.
    (line,) = links.slow_link_warnings(1_000_000, 60.0)
    assert line.startswith("slow-0:") and "240 wall s" in line
