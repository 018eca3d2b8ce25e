"""Device start-up on a real federation (issue 16 part 4): the agent process never maps ONNX
Runtime, its trainer child does (and shares the agent's cgroup, at a lower priority), and the
first task, which can arrive while the trainer is still starting, trains.
Timings are the bench's business (bench/startup_bench.py); nothing here is timed."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from .conftest import FakeDevice, Harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _trainer(agent: psutil.Process) -> psutil.Process | None:
    for child in agent.children():
        try:
            if "orchard-trainer" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.mark.timeout(120)
def test_agent_never_maps_onnxruntime_and_its_trainer_child_does(federation: Callable[..., Harness]) -> None:
    h = federation(devices=1, rounds=3, local_steps=5)
    h.start_server()
    # The device starts once the server's online state is retained: then its hello goes out
    # before anything the hello does not need starts (without one it starts them while it waits).
    watcher = FakeDevice(h, "dev0")
    h.wait_until(lambda: watcher._next(0.1) is None and watcher.server_online, "the server's online state")
    watcher.close()
    h.start_device("dev0")
    h.wait("device_hello", device="dev0")
    agent = psutil.Process(h.fed.devices["dev0"].pid)
    h.wait("update_accepted", device="dev0")
    trainer = _trainer(agent)
    assert trainer is not None, [c.cmdline() for c in agent.children()]
    assert "onnxruntime" not in _maps(agent.pid)
    assert "onnxruntime" in _maps(trainer.pid)
    # One child only: no multiprocessing resource tracker next to the trainer.
    assert [c.pid for c in agent.children()] == [trainer.pid]
    # Started by the agent, it is in the agent's cgroups (and so would be charged to a device's).
    assert Path(f"/proc/{trainer.pid}/cgroup").read_text() == Path(f"/proc/{agent.pid}/cgroup").read_text()
    assert h.wait_server_exit(60) == 0
    log = (h.run / "logs" / "dev0.log").read_text()
    marks = re.findall(r"startup pid=\d+ (.*)", log)
    # Logged at the hello and when the trainer is up; the trainer starts after the hello
    # (runtime/agent.py's doc), so the first line has no trainer mark and the second has both.
    assert len(marks) == 2 and "trainer_ready=" not in marks[0], marks
    assert all(m in marks[-1] for m in ("hello=", "trainer_ready=", "cpu_hello=")), marks
    # It yields to its agent: the agent's start-up and loop go first within the device.
    assert trainer.nice() == 19 and agent.nice() == 0
