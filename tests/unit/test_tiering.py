"""Tier by resources: the device takes the first (largest) candidate its measurements say fits
the memory cap and the round deadline at its current quota; the server assigns the device's
choice for an `[assign]` entry of "device"."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.errors import ConfigError
from runtime.protocol import Hello
from runtime.tiering import Limits, Measured, TierCache, choose_tier
from server.policies import DEVICE_CHOICE, ProfileByDevice

TIERS = ("dense", "keep=0.5,depth=0.67", "keep=0.25,depth=0.34")


def test_the_largest_measured_tier_that_fits_is_chosen(tmp_path: Path) -> None:
    cache = TierCache(tmp_path / "tiers.json")
    limits = Limits(memory_cap_mb=400.0, quota_cores=1.0, local_steps=25, deadline_s=2.0)
    assert choose_tier(TIERS, cache.entries, limits)[0] == "dense"  # not measured: try it
    cache.record("dense", Measured(peak_rss_mb=380.0, step_ms=50.0, quota_cores=1.0))  # over 90 % of the cap
    profile, reason = choose_tier(TIERS, cache.entries, limits)
    assert profile == "keep=0.5,depth=0.67" and "too big: dense: peak 380 MB of 400 MB cap" in reason
    cache.record("keep=0.5,depth=0.67", Measured(200.0, 60.0, 1.0))  # 25 x 60 ms = 1.5 s <= 2 s
    assert choose_tier(TIERS, cache.entries, limits)[0] == "keep=0.5,depth=0.67"
    # The quota halves: the step time doubles, 3 s > 2 s, so the next tier down is tried.
    halved = Limits(400.0, 0.5, 25, 2.0)
    profile, reason = choose_tier(TIERS, TierCache(tmp_path / "tiers.json").entries, halved)  # reloaded
    assert profile == "keep=0.25,depth=0.34" and "= 3 s, deadline 2 s" in reason
    cache.record("keep=0.25,depth=0.34", Measured(150.0, 100.0, 1.0))
    profile, reason = choose_tier(TIERS, cache.entries, halved)
    assert profile == "keep=0.25,depth=0.34" and reason.startswith("nothing fits")


def test_a_failed_task_measures_nothing_and_a_bad_cache_is_one_line(tmp_path: Path) -> None:
    cache = TierCache(tmp_path / "tiers.json")
    cache.record("dense", Measured(float("nan"), 10.0, 1.0))
    assert cache.entries == {}
    (tmp_path / "bad.json").write_text('{"dense": {"peak_rss_mb": 1}}')
    with pytest.raises(ConfigError, match=r"bad\.json: malformed") as err:
        TierCache(tmp_path / "bad.json")
    assert "\n" not in str(err.value)


def test_the_server_assigns_the_device_choice() -> None:
    hello = Hello("d", "rpi4b-4gb", 4.0, 4096, "t", ("keep=0.5,depth=0.67", "dense"), 10, ())
    policy = ProfileByDevice({"d": DEVICE_CHOICE, "e": "dense"})
    assert policy.profile_for("d", hello, 0) == "keep=0.5,depth=0.67"
    assert policy.profile_for("e", hello, 0) == "dense"
