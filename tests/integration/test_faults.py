"""Process faults in a real federation: a device SIGKILLed mid-round, the broker restarted, the
server SIGKILLed and resumed, the trainer child SIGKILLed (and the server moving that device to
a smaller profile). Each test checks the campaign still finishes, from what the server wrote
(events.jsonl, server.csv), with bounded waits."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import psutil
import pytest

from .conftest import Harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Federate = Callable[..., Harness]


def trainer_pid(h: Harness, device_id: str, timeout_s: float = 20.0) -> int:
    """The device's trainer: the agent's child whose command line carries the trainer marker
    (runtime/trainer_proc.py starts it with subprocess)."""

    def find() -> int | None:
        agent = psutil.Process(h.fed.devices[device_id].pid)
        for child in agent.children():
            try:
                if "orchard-trainer" in child.cmdline():
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        return None

    pid: int = h.wait_until(find, f"trainer process of {device_id}", timeout_s)
    return pid


# ---------------------------------------------------------------- 4. device killed
@pytest.mark.timeout(120)
def test_device_killed_mid_round_goes_offline_round_closes_and_it_rejoins(federation: Federate) -> None:
    # K = all devices online: the round of the killed device cannot close at K while it counts
    # in N. The broker fires its Last Will when the dead process's socket closes (a frozen one
    # would take 1.5 x the 2 s keepalive).
    h = federation(devices=3, rounds=6, local_steps=800, strategy_params={"k_fraction": 1.0})
    h.start()
    _, training = h.wait("device_status", device="dev2", state="training")
    task_id = training["task_id"]
    _, sent = h.wait("task_sent", device="dev2", task_id=task_id)
    killed_at = h.mark()
    h.fed.kill("dev2", signal.SIGKILL)

    _, will = h.wait("device_status", after=killed_at, device="dev2", state="offline")
    assert will["detail"] == "connection lost"  # the Last Will's payload, not a goodbye
    h.wait("device_offline", after=killed_at, device="dev2")
    _, abandoned = h.wait("task_abandoned", after=killed_at, device="dev2", task_id=task_id)
    assert "offline" in abandoned["reason"]
    _, closed = h.wait("aggregated", after=killed_at, closed_round=sent["round"])
    # Closed by K of the N left, or by the deadline (1.5 x the median task time once the online
    # fleet is timed); either way without the dead device.
    assert "dev2" not in closed["devices"]
    assert "K=2 of N=2" in closed["reason"] or "deadline passed" in closed["reason"], closed

    restarted_at = h.mark()
    h.start_device("dev2")
    hello_at, _ = h.wait("device_hello", after=restarted_at, device="dev2")
    _, task = h.wait("task_sent", after=hello_at, device="dev2")
    h.wait("update_accepted", after=hello_at, device="dev2", task_id=task["task_id"])
    assert h.wait_server_exit(60) == 0
    assert h.versions() == list(range(1, 7))
    assert not h.find("update_accepted", task_id=task_id)  # the killed task never came back


# ---------------------------------------------------------------- 5. broker restarted
@pytest.mark.timeout(120)
def test_broker_restart_on_the_same_port_and_the_campaign_finishes(federation: Federate) -> None:
    h = federation(devices=3, rounds=8, local_steps=300, task_timeout_s=6.0)
    h.start()
    h.wait_version(2)
    port = h.broker.port  # type: ignore[attr-defined]
    down_at = h.mark()
    # SIGKILL, not SIGTERM: amqtt's graceful shutdown keeps its listener open for seconds while
    # it closes sessions, and clients reconnect to the dying broker meanwhile.
    h.broker.kill()  # type: ignore[attr-defined]
    time.sleep(1.5)  # everyone notices and starts its reconnect backoff
    h.broker.start()
    assert h.broker.port == port  # type: ignore[attr-defined]
    h.wait("broker_disconnected", after=down_at)
    h.wait("broker_reconnected", after=down_at)
    for device_id in h.spec.device_ids():
        h.wait("device_hello", after=down_at, device=device_id)
    assert h.wait_server_exit(90) == 0
    assert h.versions() == list(range(1, 9))
    assert h.find("aggregated", after=down_at), "the campaign was over before the broker went down"


# ---------------------------------------------------------------- 6. server killed, resumed
@pytest.mark.timeout(120)
def test_server_killed_and_resumed_continues_from_its_checkpoint(federation: Federate) -> None:
    h = federation(devices=3, rounds=8, local_steps=100, task_timeout_s=5.0)
    h.start()
    h.wait_version(3)
    h.fed.kill("server", signal.SIGKILL)
    saved, _ = h.checkpoint_global()
    assert saved >= 3
    before = h.versions()
    resumed_at = h.mark()
    h.start_server(resume=True)
    _, start = h.wait("server_start", after=resumed_at)
    assert start["resume"] is True and start["version"] == saved
    assert h.wait_server_exit(90) == 0
    versions = h.versions()
    after = versions[len(before):]
    # Versions continue from the checkpoint: no restart at 1, no version written twice.
    assert versions == sorted(set(versions)) and versions[0] == 1 and versions[-1] == 8
    assert after and after[0] == saved + 1, (before, after)
    # Counts are cumulative over the campaign, the resume included (an update accepted after the
    # last checkpoint died with the server, so the count may lag the events by those).
    accepted = [int(r["accepted_total"]) for r in h.rows()]
    assert accepted == sorted(accepted) and accepted[-1] >= sum(int(r["n_updates"]) for r in h.rows())
    assert h.find("finished", after=resumed_at)


# ---------------------------------------------------------------- 7 + 8. trainer killed
@pytest.mark.timeout(120)
def test_trainer_killed_agent_reports_restarts_and_the_server_downgrades_the_profile(federation: Federate) -> None:
    # The device can run dense and width=0.5 (both in its hello, both with artifacts); the
    # server assigns dense. A SIGKILLed trainer looks like the OOM killer, so with
    # [assign] downgrade_on_oom (default true) the next task must be width=0.5.
    h = federation(devices=1, rounds=2, local_steps=1000, fallback_profiles=("width=0.5",))
    h.start()
    _, training = h.wait("device_status", device="dev0", state="training")
    agent_pid = h.fed.devices["dev0"].pid
    old_trainer = trainer_pid(h, "dev0")
    killed_at = h.mark()
    os.kill(old_trainer, signal.SIGKILL)

    _, failed = h.wait("device_status", after=killed_at, device="dev0", state="failed")
    assert failed["task_id"] == training["task_id"] and "SIGKILL" in failed["detail"], failed
    _, down = h.wait("profile_downgraded", after=killed_at, device="dev0")
    assert (down["from"], down["to"]) == ("dense", "width=0.5")
    _, task = h.wait("task_sent", after=killed_at, device="dev0")
    assert task["profile"] == "width=0.5"
    h.wait("update_accepted", after=killed_at, device="dev0", task_id=task["task_id"])
    assert trainer_pid(h, "dev0") != old_trainer
    assert h.wait_server_exit(60) == 0

    # The agent survived (same process, never dropped off the broker) with a new trainer.
    assert h.fed.devices["dev0"].pid == agent_pid
    assert not h.find("device_offline", after=killed_at) and not h.find("device_hello", after=killed_at)
    assert h.find("artifact_sent", after=killed_at, device="dev0")  # the width=0.5 artifact went out
    assert h.find("task_abandoned", after=killed_at, task_id=training["task_id"])
    assert h.versions() == [1, 2]
