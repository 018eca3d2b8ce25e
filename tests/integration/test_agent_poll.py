"""The agent's idle poll (`[device] poll_s`, scaled by the testbed with time dilation) never
delays a telemetry sample: the loop also wakes for the next sample, so the grid holds however
long the poll is. Real agent, server and broker."""

from __future__ import annotations

import csv
import itertools
import statistics
from collections.abc import Callable
from pathlib import Path

import tomllib

from testbed.prepare import write_toml

from .conftest import Harness

Federate = Callable[..., Harness]
HZ = 4.0
POLL_S = 1.0  # four sample periods: a loop that only woke on its poll would sample at ~1 Hz


def _rows(path: Path) -> list[float]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [float(r["t_s"]) for r in csv.DictReader(f)]


def test_a_long_poll_keeps_the_telemetry_grid(federation: Federate) -> None:
    h = federation(devices=1, rounds=1000, local_steps=20)
    config = h.run / "configs" / "dev0.toml"
    table = tomllib.loads(config.read_text())
    table["device"].update(telemetry_hz=HZ, poll_s=POLL_S)
    write_toml(config, table)
    h.start()
    csv_path = h.run / "devices" / "dev0.csv"
    h.wait_until(lambda: len(_rows(csv_path)) >= 16, "16 telemetry rows from dev0", timeout_s=90)
    ts = sorted(_rows(csv_path))
    # Rows the agent adds at its announce (and task ends) sit between grid samples; the median
    # gap is the grid's.
    gaps = [b - a for a, b in itertools.pairwise(ts)][2:]
    assert statistics.median(gaps) < 0.5 * POLL_S, gaps
