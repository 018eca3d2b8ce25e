"""Campaign keys of the energy and failure bookkeeping: [campaign] offline and min_devices reach
the processes that use them."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.errors import ConfigError
from testbed.campaign import load_campaign
from testbed.runner import CampaignRunner

CAMPAIGN = """
[campaign]
name = "keys"
{extra}
[[fleet]]
name = "pi5"
board = "rpi5"
count = 3
availability = {{ kind = "markov", mean_on_s = 1, mean_off_s = 100000, start = "off" }}
"""


def write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(CAMPAIGN.format(extra=extra))
    return path


def test_min_devices_and_offline_reach_the_server_and_devices(tmp_path: Path) -> None:
    c = load_campaign(write(tmp_path, 'min_devices = 2\noffline = "powered-off"'))
    assert (c.min_devices, c.offline) == (2, "powered-off")
    assert CampaignRunner(c, tmp_path / "run")._server_tables([])["rounds"]["min_devices"] == 2
    default = load_campaign(write(tmp_path, ""))
    assert (default.min_devices, default.offline) == (None, "unreachable")
    # Unset: the devices online at the start (none here, all start off), at least 1.
    assert CampaignRunner(default, tmp_path / "run")._server_tables([])["rounds"]["min_devices"] == 1


@pytest.mark.parametrize("extra, needle", [
    ('offline = "asleep"', "offline"),
    ("min_devices = 0", "min_devices"),
    ("min_devices = 4", "min_devices = 4 is more than the fleet's 3 devices"),
])
def test_bad_values_are_one_clear_error(tmp_path: Path, extra: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_campaign(write(tmp_path, extra))
