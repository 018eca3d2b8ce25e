"""Tier by resources: the device picks its own profile from what it measured (Co-S²P §1.1 maps a
Jetson's type to a model rate; here the agent measures instead of trusting the board's name).

The device config lists candidate profiles, largest first (`profiles`), and `tier =
"by-resources"`. After every task the agent records, per profile, the trainer's peak RSS and
median step time under the CPU quota it had (`TierCache`, a JSON file next to the artifact
cache: measured once per structure and kept across restarts). `choose_tier` then takes the
first candidate that fits:

- measured peak RSS ≤ (1 − `MEMORY_MARGIN`) × the memory cap (cgroup limit, else board RAM);
- its step time, rescaled to the current quota (`step_ms × quota_then / quota_now`), times the
  task's local steps, ≤ the round deadline;

A candidate not measured yet is taken as it comes (that is how it gets measured); one measured
and found too big is skipped with its reason. The choice and the reason go in the hello (the
choice first in its profiles) and in the status detail.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from runtime.errors import ConfigError
from runtime.record import record

TIER_MODES = ("fixed", "by-resources")
MEMORY_MARGIN = 0.1  # room for the agent, the allocator and a batch bigger than the probe's


@record
class Measured:
    peak_rss_mb: float
    step_ms: float
    quota_cores: float  # the CPU quota the step time was measured under


@record
class Limits:
    memory_cap_mb: float
    quota_cores: float
    local_steps: int
    deadline_s: float | None  # None: no deadline known yet


class TierCache:
    """Per profile, its last measurement; a JSON file written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, Measured] = {}
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
                self.entries = {str(k): Measured(float(v["peak_rss_mb"]), float(v["step_ms"]), float(v["quota_cores"]))
                                for k, v in raw.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ConfigError(f"tier cache {path}: malformed ({exc!r}); delete it to measure again") from None

    def record(self, profile: str, measured: Measured) -> None:
        if not all(math.isfinite(v) and v > 0 for v in (measured.peak_rss_mb, measured.step_ms, measured.quota_cores)):
            return  # a failed or empty task measures nothing
        self.entries[profile] = measured
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: v.__dict__ for k, v in sorted(self.entries.items())}, indent=1))
        tmp.replace(self.path)


def _fits(profile: str, m: Measured, limits: Limits) -> tuple[bool, str]:
    mem_ok = m.peak_rss_mb <= (1.0 - MEMORY_MARGIN) * limits.memory_cap_mb
    step_ms = m.step_ms * m.quota_cores / limits.quota_cores
    task_s = step_ms * limits.local_steps / 1e3
    time_ok = limits.deadline_s is None or task_s <= limits.deadline_s
    deadline = "no deadline yet" if limits.deadline_s is None else f"deadline {limits.deadline_s:.3g} s"
    why = (f"{profile}: peak {m.peak_rss_mb:.0f} MB of {limits.memory_cap_mb:.0f} MB cap, "
           f"{limits.local_steps} steps x {step_ms:.3g} ms at {limits.quota_cores:.2g} cores = {task_s:.3g} s, "
           f"{deadline}")
    return mem_ok and time_ok, why


def choose_tier(candidates: Sequence[str], cache: Mapping[str, Measured], limits: Limits) -> tuple[str, str]:
    """(profile, reason): the first of `candidates` (largest first) that fits `limits`."""
    if not candidates:
        raise ConfigError("tier by resources needs at least one candidate profile")
    skipped: list[str] = []
    for profile in candidates:
        m = cache.get(profile)
        if m is None:
            return profile, "; ".join([f"{profile}: not measured yet, trying it", *skipped])
        ok, why = _fits(profile, m, limits)
        if ok:
            return profile, "; ".join([f"fits: {why}", *skipped])
        skipped.append(f"too big: {why}")
    return candidates[-1], "; ".join(["nothing fits, taking the smallest", *skipped])
