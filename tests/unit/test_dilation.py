"""Time dilation: the factor, its settings, the host's free capacity, the campaign keys, the
per-quota CFS period, and the board clock the server converts device reports with."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from runtime.errors import ConfigError
from runtime.protocol import Update
from server.outputs import BoardClock
from testbed.campaign import load_campaign
from testbed.cgroups import CPU_BURST_US, CPU_PERIOD_US, MAX_PERIOD_US, MIN_PERIOD_US, cpu_period_us, cpu_quota_us
from testbed.dilation import MIN_CAPACITY_CORES, background_cores, parse_setting, plan_dilation

ROOT = Path(__file__).resolve().parents[2]


def test_auto_dilation_is_demand_over_capacity_rounded_up() -> None:
    d = plan_dilation("auto", [0.6, 0.6, 0.2, 0.2, 0.2, 0.05], host_cores=2, reserve_cores=0.5, background_cores=0.3)
    assert d.capacity_cores == pytest.approx(1.2)
    assert d.factor == pytest.approx(1.55)  # 1.85 / 1.2 = 1.5417, rounded up to 0.01
    assert d.demand_cores / d.factor <= d.capacity_cores and not d.oversubscribed and d.warning() is None
    assert d.wall_s(10.0) == pytest.approx(15.5) and d.board_s(15.5) == pytest.approx(10.0)
    assert "time dilation 1.6×" in d.describe() and "board seconds" in d.describe()
    # A fleet the host serves in real time is not slowed down.
    small = plan_dilation("auto", [0.2, 0.3], host_cores=2)
    assert small.factor == 1.0 and "no time dilation needed" in small.describe()


def test_off_and_fixed_dilation_warn_when_the_host_is_oversubscribed() -> None:
    off = plan_dilation("off", [1.0, 1.0, 1.0], host_cores=2, reserve_cores=0.5)
    assert off.factor == 1.0 and off.oversubscribed
    assert off.warning() is not None and "OVERSUBSCRIBED" in off.warning() and "3.00 cores" in off.warning()
    assert "time dilation off" in off.describe()
    fixed = plan_dilation(1.5, [1.0, 1.0, 1.0], host_cores=2, reserve_cores=0.5)
    assert fixed.factor == 1.5 and fixed.oversubscribed  # 2.0 > 1.5 cores
    assert not plan_dilation(2.0, [1.0, 1.0, 1.0], host_cores=2, reserve_cores=0.5).oversubscribed
    assert plan_dilation("off", [0.5], host_cores=2).warning() is None


def test_capacity_is_floored_and_the_reserve_checked() -> None:
    busy = plan_dilation("auto", [1.0], host_cores=2, reserve_cores=0.5, background_cores=1.9)
    assert busy.capacity_cores == MIN_CAPACITY_CORES and busy.factor == pytest.approx(1.0 / MIN_CAPACITY_CORES)
    with pytest.raises(ConfigError, match="reserve_cores = 2 leaves nothing"):
        plan_dilation("auto", [1.0], host_cores=2, reserve_cores=2)


def test_setting_parser_names_the_bad_value() -> None:
    assert parse_setting("f", "auto") == "auto" and parse_setting("f", "off") == "off" and parse_setting("f", 2) == 2.0
    for bad in ("fast", 0.5, True, float("nan"), None):
        with pytest.raises(ConfigError, match=r"f: \[throttle\] dilation must be"):
            parse_setting("f", bad)


def _proc_stat(path: Path, user: int, idle: int) -> None:
    # The real layout: cpu user nice system idle iowait irq softirq steal guest guest_nice
    path.write_text(f"cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 {user} 0 0 {idle} 0 0 0 0 0 0\nintr 1\n")


def test_background_load_is_measured_from_proc_stat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stat = tmp_path / "stat"
    _proc_stat(stat, 100, 100)
    import testbed.dilation as dil

    monkeypatch.setattr(dil.time, "sleep", lambda s: _proc_stat(stat, 175, 125))  # 75 busy of 100 jiffies
    assert background_cores(2, stat=stat) == pytest.approx(1.5)
    assert 0.0 <= background_cores(2, window_s=0.2) <= 2.0  # the real /proc/stat


def test_campaign_throttle_keys(tmp_path: Path) -> None:
    base = (ROOT / "campaigns" / "default.toml").read_text()
    c = load_campaign(ROOT / "campaigns" / "default.toml")
    assert (c.dilation, c.host_speed, c.reserve_cores) == ("auto", None, 0.5)

    def with_throttle(extra: str) -> Path:
        p = tmp_path / "c.toml"
        p.write_text(base.replace('require = false', f'require = false\n{extra}'))
        return p

    c = load_campaign(with_throttle('dilation = 3\nhost_speed = 4.5\nreserve_cores = 0.25'))
    assert (c.dilation, c.host_speed, c.reserve_cores) == (3.0, 4.5, 0.25)
    assert load_campaign(with_throttle('dilation = "off"')).dilation == "off"
    for extra, needle in (('dilation = "slow"', r"\[throttle\] dilation must be"),
                          ("host_speed = 0", r"\[throttle\] host_speed must be in"),
                          ("reserve_cores = -1", r"\[throttle\] reserve_cores must be in"),
                          ("max_oversubscription = 4", "max_oversubscription")):
        with pytest.raises(ConfigError, match=needle):
            load_campaign(with_throttle(extra))


def test_every_quota_gets_the_same_burst_per_period() -> None:
    for cores in (0.004, 0.02, 0.05, 0.1, 0.2):
        assert cpu_quota_us(cores, 2) == CPU_BURST_US
    assert cpu_period_us(0.05) == 40_000 and cpu_quota_us(0.05, 2) == 2_000
    assert cpu_period_us(1.5) == MIN_PERIOD_US and cpu_quota_us(1.5, 2) == 15_000  # large quotas: 10 ms periods
    assert cpu_period_us(0.001) == MAX_PERIOD_US and cpu_quota_us(0.001, 2) == 1_000  # the kernel's 1 ms floor
    assert cpu_period_us(None) == CPU_PERIOD_US and cpu_quota_us(None, 2) is None


def test_board_clock_converts_device_wall_time_to_board_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = BoardClock(start_unix=1000.0, dilation=2.5)
    monkeypatch.setattr("server.outputs.time.time", lambda: 1025.0)
    assert clock.now() == pytest.approx(10.0) and clock.at(1005.0) == pytest.approx(2.0)
    upd = Update("t1", "d", 0, 10, train_s=5.0, peak_rss_mb=1.0, energy_j=20.0, kind="weights",
                 metrics={"step_ms_median": 10.0, "task_wall_s": 6.0, "cpu_s": 1.0, "loss_last": 0.5})
    board = clock.update(upd)
    assert (board.train_s, board.energy_j) == (2.0, 8.0)  # power x wall time = dilation x power x board time
    assert dict(board.metrics) == {"step_ms_median": 4.0, "task_board_s": 2.4, "cpu_s": 1.0, "loss_last": 0.5}
    # Undilated, wall time is board time, and the outputs still say board.
    assert dict(BoardClock(0.0).update(upd).metrics)["task_board_s"] == 6.0
    plain = dataclasses.replace(upd, metrics={"step_ms_median": 10.0, "cpu_s": 1.0})
    assert BoardClock(0.0).update(plain) is plain


def test_campaign_stop_duration_is_board_seconds_and_the_old_key_names_the_new(tmp_path: Path) -> None:
    base = (ROOT / "campaigns" / "default.toml").read_text()
    assert load_campaign(ROOT / "campaigns" / "default.toml").duration_board_s == 100.0
    old = tmp_path / "old.toml"
    old.write_text(base.replace("duration_board_s = 100", "wall_s = 100"))
    with pytest.raises(ConfigError, match=r"old\.toml: \[stop\] wall_s is now duration_board_s") as err:
        load_campaign(old)
    assert "\n" not in str(err.value)
