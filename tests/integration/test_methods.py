"""Methods over the real stack (broker, server process, device agents with ORT trainers).
DISTREAL: devices pick their dropout vector themselves and upload full models (below).

FjORD's tiers each receive one artifact per width up to their p_max, train with per-batch width
sampling, and the global model learns."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from models.builder import build
from models.structure import full_structure

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


@pytest.mark.timeout(200)
def test_zerofl_sparse_uploads_bytes_are_what_the_broker_carried(federation: Federate) -> None:
    """ZeroFL top-k-diff uploads at density (1 − 0.9) + 0.1 over mosquitto: the model learns, the
    updates travel sparse, and the uplink bytes the server records are the MQTT payloads an
    independent subscriber received from the broker (frame + chunk headers)."""
    import struct
    import uuid

    from runtime.chunks import _CHUNK
    from runtime.mqtt import Message, MqttClient, MqttConfig

    h = federation(broker="mosquitto", devices=3, rounds=3, strategy="fedavg", method="zerofl",
                   method_params={"sparsity": 0.9, "mask_ratio": 0.1, "upload": "top-k-diff"}, local_steps=15)
    login = h.lab.server  # the broker takes only the lab's logins; a device's may not read others' updates
    ca = str(h.lab.tls.ca_file) if h.lab.tls else None
    observer = MqttClient(h.broker.url, MqttConfig(f"observer-{uuid.uuid4().hex[:6]}", keepalive_s=5,
                                                   username=login.username, password=login.password, ca_file=ca))
    observer.connect()
    observer.subscribe(f"{h.root}/dev/+/update", qos=1)
    h.start()
    assert h.wait_server_exit(180) == 0
    seen: dict[str, list[bytes]] = {}
    while isinstance(msg := observer.get(2.0), Message):
        seen.setdefault(msg.topic.split("/")[-2], []).append(msg.payload)
    observer.close()
    rows = h.rows()
    assert [int(r["version"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["accuracy"]) > float(rows[0]["accuracy"]) or float(rows[-1]["accuracy"]) > 0.5
    received = h.find("update_received")
    assert len(received) == 9 and not h.find("update_rejected")
    for device, chunks in seen.items():
        logged = [e for e in received if e["device"] == device]
        assert sum(e["bytes"] for e in logged) == sum(len(c) for c in chunks)  # what the broker carried
        headers = sum(_CHUNK.size + struct.unpack_from("<4sBBIIII", c)[2] for c in chunks)
        assert sum(e["bytes"] - e["frame_bytes"] for e in logged) == headers
    dense_task = h.find("task_frame")[0]["frame_bytes"]
    for e in received:  # 20% of each weight tensor as values + int32 indices, biases dense
        assert e["frame_bytes"] < 0.5 * dense_task, (e["frame_bytes"], dense_task)
    reports = [e["report"] for e in h.find("update_accepted")]
    assert all(0.19 < r["upload_fraction"] < 0.22 and r["topk_recomputes"] == 15 for r in reports)


LENET_FRONT = {"format": 1, "model": "lenet", "groups": {"conv1": 6, "conv2": 16}, "vectors": [
    {"drop": {}, "step_ms": 1e6, "score": 0.9},  # "profiled" so slow that it never fits the deadline
    {"drop": {"conv1": 0.5, "conv2": 0.5}, "step_ms": 1.0, "score": 0.5}]}


@pytest.mark.timeout(200)
def test_distreal_devices_pick_their_vector_train_full_models_and_the_model_learns(federation: Federate) -> None:
    """The real stack: every device gets the dense and the vector's artifact, picks the vector
    that fits the deadline by itself, trains it per batch and uploads the full dense model."""
    h = federation(devices=2, rounds=4, strategy="fedavg-deadline", strategy_params={"deadline_s": 30.0},
                   method="distreal", method_params={"front": LENET_FRONT}, local_steps=12)
    full_size = build(full_structure("lenet", (1, 8, 8), 10)).layout.total
    h.start()
    assert h.wait_server_exit(180) == 0
    accuracy = [float(r["accuracy"]) for r in h.rows()]
    assert len(accuracy) == 4 and accuracy[-1] > accuracy[0], accuracy
    assert Counter(e["device"] for e in h.find("artifact_sent")) == {"dev0": 2, "dev1": 2}
    accepted = h.find("update_accepted")
    assert len(accepted) == 8 and not h.find("update_rejected")
    for e in accepted:
        assert e["report"]["steps.1"] == 12 and e["report"]["choice.0.vector"] == 1  # the one that fits
        assert e["n_values"] == full_size  # the full dense model came back, not the vector's slice


@pytest.mark.timeout(200)
def test_cos2p_tiers_learn_masks_upload_masked_deltas_and_the_model_learns(federation: Federate) -> None:
    """Co-S²P over the real stack (multi-exit cnn on digits): every tier gets its three artifacts,
    learns its mask in the mask rounds, uploads only its mask's coordinates (exit heads included),
    the server keeps every exit and scores each."""
    h = federation(devices=3, rounds=5, strategy="semi-async",
                   strategy_params={"k_fraction": 1.0, "weight": "cos2p", "merge": "masked-delta"},
                   model="cnn", method="cos2p", method_params={"mask_rounds": 1, "kd_from_round": 2}, local_steps=20,
                   profiles=("keep=0.25,depth=0.5", "keep=0.5", "dense"))
    h.start()
    assert h.wait_server_exit(180) == 0
    rows = h.rows()
    assert [int(r["version"]) for r in rows] == [1, 2, 3, 4, 5]
    assert max(float(r["accuracy"]) for r in rows) > 0.4, rows  # 10 digits: chance is 0.1
    assert not h.find("update_rejected")
    sent = Counter(e["device"] for e in h.find("artifact_sent"))
    assert sent == {"dev0": 3, "dev1": 3, "dev2": 2}  # keep 1: the slice is the primary artifact
    accepted = h.find("update_accepted")
    by_device: dict[str, list[dict[str, Any]]] = {}
    for e in accepted:
        by_device.setdefault(e["device"], []).append(e)
    full = next(e["n_values"] for e in by_device["dev2"])
    assert all(e["n_values"] < full for d in ("dev0", "dev1") for e in by_device[d])
    for device, events in by_device.items():
        first, *later = sorted(events, key=lambda e: e["task_round"])
        assert first["report"]["mask_steps"] == 10 and all(e["report"]["mask_steps"] == 0 for e in later)
        assert len({e["n_values"] for e in events}) == 1, device  # one frozen mask, one size
        assert any(e["report"]["kd_on"] == 1.0 for e in later)
    evaluated = h.find("evaluate")
    assert all(len(e["exit_accuracy"]) == 2 for e in evaluated)  # cnn: exit 1 and the final head


@pytest.mark.timeout(200)
def test_chenqin_class_subsets_from_labels_harvested_over_the_real_stack(federation: Federate) -> None:
    """Chen & Qin on three devices holding disjoint digit classes: the campaign derives each
    device's classes from its labels, the server scores relevance with ORT on the proxy split
    (at version 0 and after each merge), the devices train different relevant filters, and the
    harvested model learns."""
    h = federation(devices=3, rounds=3, strategy="fedavg", strategy_params={"merge": "per-element"},
                   partition="classes:0-3;4-6;7-9", method="chenqin",
                   method_params={"proxy_samples": 100, "relevance_batch": 32}, local_steps=20,
                   profiles=("width=0.5",))
    h.start()
    assert h.wait_server_exit(180) == 0
    rows = h.rows()
    assert [int(r["version"]) for r in rows] == [1, 2, 3]
    # Ten classes and no device sees more than four: chance is 0.1 (one run here went 0.18, 0.33, 0.29).
    assert max(float(r["accuracy"]) for r in rows) > 0.25, rows
    sent = {e["device"]: e["profile"] for e in h.find("task_sent")}
    assert sent == {"dev0": "width=0.5,classes=0+1+2+3", "dev1": "width=0.5,classes=4+5+6",
                    "dev2": "width=0.5,classes=7+8+9"}
    assert not h.find("update_rejected")
