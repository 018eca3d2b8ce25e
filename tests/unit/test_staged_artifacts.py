"""The device holds every artifact the server pushes ahead of one task: the server sends a task's
artifacts (up to ARTIFACT_BURST at once) before the task, and the device may keep only what its
staging holds until the task names them. With 4 held, a DISTREAL task (8 artifacts: one per
vector of the committed front) lost its first four and waited for them forever."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.manifest import STAGED_LIMIT, StagedArtifacts
from server.guard import ARTIFACT_BURST

ROOT = Path(__file__).resolve().parents[2]


def test_staging_holds_what_the_server_pushes_at_once(tmp_path: Path) -> None:
    assert STAGED_LIMIT == ARTIFACT_BURST
    staged = StagedArtifacts(tmp_path)
    keys = [f"{i:016x}" for i in range(ARTIFACT_BURST + 1)]
    for key in keys[:-1]:
        assert staged.hold(key, {"manifest.json": b"{}"}) == []
    assert staged.hold(keys[-1], {"manifest.json": b"{}"}) == [keys[0]]  # beyond a burst: the oldest goes


def test_a_distreal_task_of_the_committed_front_fits() -> None:
    front = json.loads((ROOT / "campaigns" / "fronts" / "cnn-rpi4b-4gb.json").read_text())
    assert 4 < len(front["vectors"]) <= STAGED_LIMIT
