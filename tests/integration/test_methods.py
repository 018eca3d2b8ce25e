"""Methods over the real stack (broker, server process, device agents with ORT trainers):
FjORD's tiers each receive one artifact per width up to their p_max, train with per-batch width
sampling, and the global model learns."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

Federate = Callable[..., Any]


@pytest.mark.timeout(200)
def test_fjord_tiers_train_nested_widths_and_the_model_learns(federation: Federate) -> None:
    h = federation(devices=3, rounds=4, strategy="fedavg", strategy_params={"merge": "per-element"},
                   method="fjord", method_params={"widths": [0.25, 0.5, 1.0]}, local_steps=20,
                   profiles=("p_max=0.25", "p_max=0.5", "dense"))
    h.start()
    assert h.wait_server_exit(180) == 0
    rows = h.rows()
    assert [int(r["version"]) for r in rows] == [1, 2, 3, 4]
    accuracy = [float(r["accuracy"]) for r in rows]
    assert accuracy[-1] > accuracy[0], accuracy
    # One artifact per width a tier may sample: 1, 2 and 3 of them.
    assert Counter(e["device"] for e in h.find("artifact_sent")) == {"dev0": 1, "dev1": 2, "dev2": 3}
    sent = {e["device"]: e["profile"] for e in h.find("task_sent")}
    assert sent == {"dev0": "p_max=0.25", "dev1": "p_max=0.5", "dev2": "dense"}
    visits: dict[str, Counter[str]] = {}
    for e in h.find("update_accepted"):
        visits.setdefault(e["device"], Counter()).update(
            {k: int(v) for k, v in e["report"].items() if k.startswith("steps_width_")})
    assert set(visits["dev0"]) == {"steps_width_0.25"}
    assert set(visits["dev2"]) == {"steps_width_1", "steps_width_0.5", "steps_width_0.25"}
    assert all(n > 0 for n in visits["dev2"].values()) and sum(visits["dev2"].values()) == 4 * 20
    assert not h.find("update_rejected")
