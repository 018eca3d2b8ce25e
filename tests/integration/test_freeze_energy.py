"""A frozen cgroup, as the testbed takes a device offline, is what `FreezeWatch` measures: the
seconds the powered-off energy mode leaves out of the integral. Real cgroup freezer."""

from __future__ import annotations

import time

import pytest

from testbed.throttle import Throttle
from tests.integration.test_throttle_v1 import Spawn, _go, prefix, spawn, throttle  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WATCH = (
    "import sys\nsys.stdin.readline()\n"
    "from runtime.telemetry import FreezeWatch\n"
    "watch = FreezeWatch()\nprint('ready', flush=True)\n"
    "sys.stdin.readline()\nprint(watch.frozen_s, flush=True)\n"
)


def test_freeze_watch_measures_a_frozen_cgroup(throttle: Throttle, spawn: Spawn) -> None:  # noqa: F811
    group = throttle.create("frozen", 0.5, None)
    child = spawn(WATCH)
    group.add_pid(child.pid)
    _go(child)
    assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
    time.sleep(0.5)
    group.freeze()
    time.sleep(3.0)
    group.thaw()
    time.sleep(0.5)
    _go(child)
    frozen_s = float(child.stdout.readline())
    assert 2.4 <= frozen_s <= 3.3, frozen_s
