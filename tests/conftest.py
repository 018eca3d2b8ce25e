"""Shared fixtures. Tests that need mosquitto or cgroups skip where those are absent, unless
ORCHARD_REQUIRE_MOSQUITTO / ORCHARD_REQUIRE_CGROUPS is set (as in CI), where they fail."""

from __future__ import annotations

import os
import shutil

import pytest


def require_or_skip(env_var: str, available: bool, why: str) -> None:
    if available:
        return
    if os.environ.get(env_var) == "1":
        pytest.fail(f"{why} ({env_var}=1 makes this a failure, not a skip)")
    pytest.skip(why)


@pytest.fixture
def mosquitto_bin() -> str:
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    require_or_skip("ORCHARD_REQUIRE_MOSQUITTO", path is not None, "mosquitto is not installed")
    assert path is not None
    return path
