"""The trainer child at shutdown and after a death between jobs (real child process)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.protocol import Assignment
from runtime.trainer_proc import TrainerDied, TrainerProcess, TrainJob


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    path = tmp_path / "shard.npz"
    np.savez(path, x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.int64))
    return path


def test_sigterm_to_the_process_group_leaves_the_trainer_to_the_agent(shard: Path) -> None:
    # The runner stops a device with SIGTERM to its whole process group; the agent must still be
    # able to talk to its trainer while it shuts down (it used to die: BrokenPipeError traceback).
    trainer = TrainerProcess(shard)
    pid = trainer.pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert trainer.pid == pid  # still alive
    trainer.close()
    assert trainer.pid is None


def test_submit_to_a_trainer_that_died_between_jobs_raises_trainer_died(shard: Path) -> None:
    trainer = TrainerProcess(shard)
    pid = trainer.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    job = TrainJob("j1", "/nonexistent", Assignment("fedavg", "dense", ("none",)), "weights", steps=1, epochs=0,
                   batch_size=2, lr=0.1, seed=0)
    with pytest.raises(TrainerDied, match="trainer died before job j1: killed by SIGKILL"):
        trainer.submit(job, np.zeros(10, np.float32))
    trainer.restart()
    assert trainer.pid is not None and trainer.pid != pid
    trainer.close()


def test_trainer_whose_agent_closed_mid_job_exits_quietly(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from models.artifacts import ensure_artifacts
    from models.structure import full_structure
    from runtime.manifest import read_manifest

    art = ensure_artifacts(full_structure("mlp", (1, 8, 8), 10), "sgd", tmp_path / "cache")
    path = tmp_path / "shard.npz"
    np.savez(path, x=np.random.default_rng(0).normal(size=(64, 1, 8, 8)).astype(np.float32),
             y=np.arange(64, dtype=np.int64) % 10)
    trainer = TrainerProcess(path)
    proc = trainer._proc
    n_params = read_manifest(art.directory).layout.total
    job = TrainJob("j1", str(art.directory.parent), Assignment("fedavg", "dense", (art.key,)), "weights", steps=3000,
                   epochs=0, batch_size=8, lr=0.1, seed=0)
    trainer.submit(job, np.zeros(n_params, np.float32))
    assert trainer._conn is not None
    trainer._conn.close()  # the agent is gone while the child trains: its reply has nowhere to go
    proc.join(60)
    assert proc.exitcode == 0
    assert "Traceback" not in capfd.readouterr().err
