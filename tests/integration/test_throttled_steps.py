"""Throttled ONNX Runtime training steps follow the CPU quota (real cgroups, real ORT steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.artifacts import ensure_artifacts
from models.builder import build
from models.structure import full_structure, sub_structure
from runtime.profile import Profile
from runtime.submodel import index_map_for
from testbed.throttle import detect_throttle
from tests.conftest import require_or_skip

ROOT = Path(__file__).resolve().parents[2]


def _probe_in_group(group, artifact: Path, steps: int) -> dict:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "trainer_probe.py"), "--artifact", str(artifact), "--threads", "1",
         "--steps", str(steps), "--warmup", "3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: group.add_pid(os.getpid()),
    )
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.integration
def test_step_time_follows_quota(tmp_path):
    throttle = detect_throttle(run_id="steptest")
    require_or_skip("ORCHARD_REQUIRE_CGROUPS", throttle.backend != "none", f"no cgroups: {throttle.warning}")
    full = full_structure("cnn", (3, 32, 32), 10)
    imap = index_map_for(Profile(width=0.25), build(full).layout.groups)
    artifact = ensure_artifacts(sub_structure(full, imap), cache_dir=tmp_path).directory
    try:
        slow = throttle.create("quota-025", 0.25, None)
        fast = throttle.create("quota-050", 0.5, None)
        # ~10 ms per step unthrottled: 40 steps span many 100 ms CFS periods at either quota.
        r_slow = _probe_in_group(slow, artifact, steps=40)
        r_fast = _probe_in_group(fast, artifact, steps=40)
    finally:
        throttle.close()
    ratio = r_slow["step_ms_mean"] / r_fast["step_ms_mean"]
    print(f"step_ms_mean at 0.25 cores {r_slow['step_ms_mean']:.1f}, at 0.5 cores {r_fast['step_ms_mean']:.1f}")
    assert 1.6 <= ratio <= 2.4, (ratio, r_slow["step_ms_mean"], r_fast["step_ms_mean"])
