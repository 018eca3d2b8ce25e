"""The assign policy's failure hook: a device whose task failed with `failure = "oom"` moves to
the next smaller profile its Hello lists (what "smaller" means is the method's), on the pure
engine (no I/O), and the choice survives a checkpoint. The same path runs over MQTT in
tests/integration/test_faults.py (trainer SIGKILL)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.methods import spec
from runtime.protocol import Hello, Status, Update
from server import checkpoint
from server.config import load_server_config
from server.engine import Engine
from server.events import Action, DeviceHello, DeviceStatus, Log, SendTask, Tick, UpdateReceived
from server.methods import server_method
from server.policies import DowngradeOnOom, ProfileByDevice, TableModel
from server.strategies import get_strategy

N = 8
OOM = "trainer died during job t1: killed by SIGKILL (exit -9); under a memory cap this is the OOM killer"
TABLE = {
    "width=0.75": np.arange(6, dtype=np.int64),
    "width=0.5": np.arange(4, dtype=np.int64),
    "width=0.25": np.arange(2, dtype=np.int64),
}


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def hello(device_id: str, profiles: tuple[str, ...]) -> Hello:
    return Hello(device_id=device_id, board="test", cores=1.0, ram_mb=512, runtime_version="t", profiles=profiles,
                 n_samples=10, label_histogram=())


class Rig:
    def __init__(self, profiles: tuple[str, ...], table: dict[str, np.ndarray] | None = None) -> None:
        self.clock = Clock()
        model = TableModel(N, TABLE if table is None else table)
        assign = DowngradeOnOom(ProfileByDevice({}, "dense"), server_method(None, None, model))
        self.engine = Engine(get_strategy("semi-async", k=1), model, np.zeros(N, np.float32),
                             clock=self.clock, assign=assign)
        self.actions: list[Action] = []
        self.send(DeviceHello("d0", hello("d0", profiles)))
        self.send(Tick())

    def send(self, event: Any) -> None:
        self.actions += self.engine.handle(event)

    def tasks(self) -> list[SendTask]:
        return [a for a in self.actions if isinstance(a, SendTask)]

    def logs(self, name: str) -> list[Mapping[str, Any]]:
        return [a.event for a in self.actions if isinstance(a, Log) and a.event["event"] == name]

    def fail(self, detail: str = OOM, failure: str | None = "oom") -> None:
        task = self.tasks()[-1]
        self.send(DeviceStatus("d0", Status("d0", "failed", 0.0, task.task_id, detail, failure)))


def test_oom_moves_the_device_down_one_profile_at_a_time() -> None:
    rig = Rig(("dense", "width=0.5", "width=0.75", "width=0.25"))
    assert rig.tasks()[-1].assignment.profile == "dense"
    rig.fail()
    down = rig.logs("profile_downgraded")
    assert [(d["device"], d["from"], d["to"]) for d in down] == [("d0", "dense", "width=0.75")]
    assert "SIGKILL" in down[0]["reason"] and down[0]["failure"] == "oom"
    # The abandoned task is re-sent at once, under the smaller profile and its coordinates.
    assert rig.tasks()[-1].assignment.profile == "width=0.75"
    np.testing.assert_array_equal(rig.tasks()[-1].indices, TABLE["width=0.75"])
    rig.fail("MemoryError in the trainer")
    rig.fail("the detail text does not matter, the failure kind does")
    assert [d["to"] for d in rig.logs("profile_downgraded")] == ["width=0.75", "width=0.5", "width=0.25"]
    # Nothing smaller left: the profile stays, and no downgrade is logged.
    rig.fail()
    assert len(rig.logs("profile_downgraded")) == 3 and rig.tasks()[-1].assignment.profile == "width=0.25"


def test_other_failures_and_devices_without_smaller_profiles_keep_their_profile() -> None:
    rig = Rig(("dense", "width=0.5"))
    rig.fail("task t1 unusable: tensors: unknown tensor 'x'", failure="error")
    rig.fail("killed by signal 15", failure="killed")
    rig.fail("an out-of-memory word in the text of an old device", failure=None)
    assert rig.logs("profile_downgraded") == [] and rig.tasks()[-1].assignment.profile == "dense"
    lonely = Rig(("dense",))
    lonely.fail()
    assert lonely.logs("profile_downgraded") == [] and lonely.tasks()[-1].assignment.profile == "dense"
    assert len(lonely.logs("task_abandoned")) == 1


def test_only_profiles_the_server_has_artifacts_for_are_chosen() -> None:
    rig = Rig(("dense", "width=0.75", "width=0.5"), table={"width=0.5": TABLE["width=0.5"]})
    rig.fail()
    assert rig.logs("profile_downgraded")[0]["to"] == "width=0.5"


def test_the_override_is_checkpointed_and_dropped_when_the_hello_no_longer_offers_it(tmp_path: Path) -> None:
    rig = Rig(("dense", "width=0.5"))
    rig.fail()
    task = rig.tasks()[-1]
    assert task.assignment.profile == "width=0.5"
    upd = Update(task_id=task.task_id, device_id="d0", base_version=0, n_samples=1, train_s=0.0, peak_rss_mb=0.0,
                 energy_j=None, kind="delta")
    rig.send(UpdateReceived("d0", upd, np.ones(4, np.float32)))  # K=1: closes the round
    checkpoint.save(tmp_path, rig.engine)
    restored = checkpoint.load(tmp_path, model=TableModel(N, TABLE), clock=rig.clock, assign=rig.engine.assign)
    assert restored.devices["d0"].profile_override == "width=0.5"
    restored.handle(DeviceHello("d0", hello("d0", ("dense",))))
    assert restored.devices["d0"].profile_override is None


def test_smaller_profiles_orders_by_width_and_keeps_window_and_classes() -> None:
    offered = ("width=0.5", "dense", "width=0.75", "width=0.5,window=rolling", "classes=0-4", "bogus=1")
    method = server_method("heterofl", {}, TableModel(N, TABLE))
    assert method.smaller("dense", offered) == ["width=0.75", "width=0.5"]
    assert method.smaller("width=0.5", offered) == []


def test_fjord_falls_back_to_a_lower_p_max() -> None:
    method = server_method("fjord", spec("fjord").params({"widths": [0.25, 0.5, 1.0]}), TableModel(N, TABLE))
    assert method.smaller("dense", ("p_max=0.25", "dense", "p_max=0.5", "width=0.5")) == ["p_max=0.5", "p_max=0.25"]


@pytest.mark.parametrize(("text", "expected"), [("", True), ("downgrade_on_oom = false", False)])
def test_server_config_switch(tmp_path: Path, text: str, expected: bool) -> None:
    path = tmp_path / "server.toml"
    path.write_text(f'[server]\nroot = "orchard/t"\nartifacts = "a.json"\neval_data = "e.npz"\n'
                    f'credentials = "s.toml"\nrun_id = "r1"\n[assign]\n{text}\n')
    assert load_server_config(path).downgrade_on_oom is expected
