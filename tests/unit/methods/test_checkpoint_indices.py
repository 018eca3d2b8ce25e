"""A method whose task coordinates are not a function of (profile, round) has them stored in the
checkpoint and restored as sent; derivable ones are recomputed and not stored."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.protocol import Assignment
from server import checkpoint
from server.aggregate import IndexArray
from server.methods.fedavg import Server as FedavgServer
from server.policies import TableModel
from server.strategies import get_strategy
from tests.unit.methods.server_rig import Rig

N = 8


class Drawn(FedavgServer):
    """Coordinates drawn per assignment (like DISTREAL's filter subsets): not derivable."""

    indices_derivable = False
    draws = 0

    def assign(self, profile: str, round_index: int) -> tuple[Assignment, IndexArray | None]:
        assignment, _ = super().assign("dense", round_index)
        Drawn.draws += 1
        return assignment, np.sort(np.random.default_rng(Drawn.draws).choice(N, 3, replace=False)).astype(np.int64)


def test_drawn_indices_survive_a_checkpoint(tmp_path: Path) -> None:
    model = TableModel(N)
    rig = Rig(get_strategy("semi-async", k=2, merge="per-element"), model, {"a": "dense", "b": "dense"})
    rig.engine.method = Drawn({}, model)
    rig.engine._assign_cache.clear()
    rig.update("a", rig.g0 + 1.0)
    rig.update("b", rig.g0 + 1.0)  # closes version 1; both get new tasks with drawn indices
    sent = {t.device_id: t.indices for t in rig.engine.outstanding.values()}
    checkpoint.save(tmp_path, rig.engine)
    restored = checkpoint.load(tmp_path, model=model, clock=lambda: 0.0, method=Drawn({}, model))
    for task in restored.outstanding.values():
        np.testing.assert_array_equal(task.indices, sent[task.device_id])
    state = checkpoint._read_state(checkpoint.checkpoint_dir(tmp_path))
    assert state is not None and all("indices" in t for t in state["tasks"])


def test_derivable_indices_are_not_stored(tmp_path: Path) -> None:
    model = TableModel(N, {"width=0.5": np.arange(4, dtype=np.int64)})
    rig = Rig(get_strategy("semi-async", k=2, merge="per-element"), model, {"a": "width=0.5", "b": "dense"})
    rig.update("a", rig.g0 + 1.0)
    rig.update("b", rig.g0 + 1.0)
    checkpoint.save(tmp_path, rig.engine)
    state = checkpoint._read_state(checkpoint.checkpoint_dir(tmp_path))
    assert state is not None and state["tasks"] and not any("indices" in t for t in state["tasks"])
