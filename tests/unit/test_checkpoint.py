"""Checkpoints: resume continues from the last version; a torn write never replaces a good one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import ConfigError
from server import checkpoint
from server.engine import Engine
from server.memory import SimDevice, VirtualClock, simulate
from server.policies import DenseModel, ProfileByDevice, TableModel
from server.strategies import get_strategy

N = 12
G0 = np.zeros(N, np.float32)


def fleet() -> list[SimDevice]:
    r = np.random.default_rng(2)
    return [SimDevice(f"d{i}", r.normal(size=N).astype(np.float32), n_samples=10 * (i + 1), step_s=0.1 * (i + 1))
            for i in range(5)]


@pytest.mark.parametrize(("name", "params"), [("fedavg", {}), ("semi-async", {"max_staleness": 3}),
                                              ("fedbuff", {"k": 2})])
def test_resumed_engine_continues_exactly_like_an_uninterrupted_run(
        tmp_path: Path, name: str, params: dict[str, object]) -> None:
    strategy = get_strategy(name, **params)
    straight = simulate(strategy, fleet(), initial_global=G0, until_version=8)

    first = simulate(strategy, fleet(), initial_global=G0, until_version=4, checkpoint_dir=tmp_path)
    assert checkpoint.latest_version(tmp_path) == 4
    # "Kill": drop the engine, build a new one from disk, on a clock that resumes where it stopped.
    clock = VirtualClock(first.clock.now)
    resumed = checkpoint.load(tmp_path, model=DenseModel(N), clock=clock)
    assert resumed.version == 4 and resumed.strategy.name == name
    np.testing.assert_array_equal(resumed.global_flat, first.global_flat)
    assert set(resumed.outstanding) == set(first.engine.outstanding)
    rest = simulate(strategy, fleet(), engine=resumed, clock=clock, until_version=8)
    assert [v.version for v in rest.versions] == [5, 6, 7, 8]
    np.testing.assert_allclose(rest.global_flat, straight.global_flat, atol=1e-6)


def test_resume_rebuilds_the_strategy_and_keeps_submodel_tasks(tmp_path: Path) -> None:
    model = TableModel(N, {"width=0.5": np.arange(N // 2, dtype=np.int64)})
    assign = ProfileByDevice({"d1": "width=0.5"})
    res = simulate(get_strategy("semi-async", k=2, merge="per-element"), fleet(), initial_global=G0,
                   until_version=3, model=model, assign=assign, checkpoint_dir=tmp_path)
    engine = checkpoint.load(tmp_path, model=model, clock=VirtualClock(res.clock.now), assign=assign)
    assert engine.strategy.params["k"] == 2 and engine.strategy.params["merge"] == "per-element"
    for task in engine.outstanding.values():
        if task.profile == "width=0.5":
            np.testing.assert_array_equal(task.indices, np.arange(N // 2))
    # Every base an outstanding task started from is still there, so its update can be merged.
    assert all(engine.model_at(t.base_version) is not None for t in engine.outstanding.values())


def test_torn_writes_never_replace_the_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = simulate(get_strategy("fedavg"), fleet(), initial_global=G0, until_version=3, checkpoint_dir=tmp_path)
    good = res.global_flat.copy()
    directory = checkpoint.checkpoint_dir(tmp_path)
    # Leftovers of a crash mid-write: a half-written state and a stray array file.
    (directory / "state.json.tmp").write_text('{"version": 99, "trunc')
    (directory / "ckpt-000099-global.npy.tmp").write_bytes(b"\x93NUMPY garbage")

    # A save that dies just before committing state.json.
    real_replace = os.replace

    def crash_on_state(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(dst).endswith("state.json"):
            raise OSError("killed")
        real_replace(src, dst)

    engine = res.engine
    tasks = list(engine.outstanding.values())
    assert tasks
    monkeypatch.setattr(os, "replace", crash_on_state)
    moved = Engine(engine.strategy, DenseModel(N), np.ones(N, np.float32), clock=VirtualClock())
    with pytest.raises(OSError, match="killed"):
        checkpoint.save(tmp_path, moved)
    monkeypatch.setattr(os, "replace", real_replace)

    loaded = checkpoint.load(tmp_path, model=DenseModel(N), clock=VirtualClock())
    assert loaded.version == 3
    np.testing.assert_array_equal(loaded.global_flat, good)


def test_corrupt_or_missing_checkpoints_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint"):
        checkpoint.load(tmp_path, model=DenseModel(N), clock=VirtualClock())
    assert checkpoint.latest_version(tmp_path) is None
    simulate(get_strategy("fedavg"), fleet(), initial_global=G0, until_version=1, checkpoint_dir=tmp_path)
    directory = checkpoint.checkpoint_dir(tmp_path)
    with pytest.raises(ConfigError, match="strategy 'fedavg'"):
        checkpoint.load(tmp_path, model=DenseModel(N), clock=VirtualClock(), strategy=get_strategy("fedbuff"))
    state = json.loads((directory / "state.json").read_text())
    global_file = directory / state["global_file"]
    arr = np.load(global_file)
    arr[0] += 1.0
    np.save(global_file, arr)
    with pytest.raises(ConfigError, match="sha256"):
        checkpoint.load(tmp_path, model=DenseModel(N), clock=VirtualClock())
    (directory / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        checkpoint.load(tmp_path, model=DenseModel(N), clock=VirtualClock())


def test_old_files_are_removed_after_commit(tmp_path: Path) -> None:
    simulate(get_strategy("fedavg"), fleet(), initial_global=G0, until_version=5, checkpoint_dir=tmp_path)
    names = sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir())
    assert names == ["ckpt-000005-global.npy", "ckpt-000005-history.npz", "state.json"]
