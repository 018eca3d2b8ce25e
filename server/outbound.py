"""What the aggregator sends a device: tasks, the artifacts a task names, and receipts.

Each frame is sealed (runtime/seal.py) under the device's key for this run and kind, then
published as chunks (runtime/chunks.py). Artifact frames are rate-limited per device; an
artifact the device already holds (its hello lists it, or it was sent) is not sent again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from runtime.chunks import chunk_frame
from runtime.frames import encode_artifact, encode_task
from runtime.layout import FloatArray
from runtime.manifest import manifest_digest
from runtime.mqtt import MqttClient
from runtime.protocol import Artifact, Receipt, Task, Topics, encode_json
from runtime.seal import seal
from server.config import TrainKnobs
from server.events import EventName, SendTask
from server.guard import ARTIFACT_BURST, ARTIFACT_PER_S, TokenBuckets
from server.model import ServerModel
from server.outputs import Outputs


class Outbound:
    def __init__(self, mqtt: MqttClient, topics: Topics, keys: Mapping[str, bytes], run_id: str,
                 model: ServerModel, out: Outputs) -> None:
        self.mqtt = mqtt
        self.topics = topics
        self.keys = keys
        self.run_id = run_id
        self.model = model
        self.out = out
        self.artifact_limit = TokenBuckets(ARTIFACT_BURST, ARTIFACT_PER_S)
        self.known_artifacts: dict[str, set[str]] = {}
        self._send_seq = 0

    def seal(self, device_id: str, kind: str, payload: bytes) -> bytes:
        return seal(payload, key=self.keys[device_id], run_id=self.run_id, device_id=device_id, kind=kind)

    def publish_receipt(self, receipt: Receipt) -> None:
        payload = self.seal(receipt.device_id, "receipt", encode_json(receipt))
        self.mqtt.publish(self.topics.receipt(receipt.device_id), payload, qos=1)
        self.out.event({"event": EventName.RECEIPT_SENT, "device": receipt.device_id, "task_id": receipt.task_id,
                        "accepted": receipt.accepted})

    def send_task(self, action: SendTask, global_flat: FloatArray, knobs: TrainKnobs, dilation: float) -> None:
        a = action.assignment
        flat = np.asarray(global_flat)
        weights = flat if action.indices is None else flat[action.indices]
        known = self.known_artifacts.setdefault(action.device_id, set())
        for key in dict.fromkeys(a.artifact_keys):
            if key in known:
                continue
            if not self.artifact_limit.allow(action.device_id):
                self.out.event({"event": EventName.ARTIFACT_HELD, "device": action.device_id, "key": key,
                                "reason": f"more than {ARTIFACT_BURST} artifact frames in "
                                          f"{ARTIFACT_BURST / ARTIFACT_PER_S:g} s"})
                continue
            # frame_bytes: the sealed frame, what was chunked (as for updates and tasks).
            frame = self.seal(action.device_id, "artifact",
                              encode_artifact(Artifact(key, self.model.artifact_files(key))))
            wire_bytes = self.publish_chunks(self.topics.artifact(action.device_id), frame)
            known.add(key)
            self.out.event({"event": EventName.ARTIFACT_SENT, "device": action.device_id, "key": key,
                            "bytes": wire_bytes, "frame_bytes": len(frame)})
        task = Task(
            task_id=action.task_id, round=action.round, base_version=action.base_version,
            model_id=self.model.model_name, assignment=a,
            local_steps=knobs.local_steps, local_epochs=knobs.local_epochs, lr=knobs.lr,
            # The engine counts board seconds; a device measures its own wall time (dilated here).
            batch_size=knobs.batch_size, deadline_s=(action.deadline_s or 0.0) * dilation,
            upload=knobs.upload,
            encoding=knobs.encoding, tensors=self.model.by_key(a.primary_key).manifest.layout.split(weights),
            artifact_digests={k: manifest_digest(self.model.by_key(k).manifest.raw) for k in a.artifact_keys},
        )
        frame = self.seal(action.device_id, "task", encode_task(task))
        wire_bytes = self.publish_chunks(self.topics.task(action.device_id), frame)
        self.out.event({"event": EventName.TASK_FRAME, "device": action.device_id, "task_id": action.task_id,
                        "bytes": wire_bytes, "frame_bytes": len(frame)})

    def publish_chunks(self, topic: str, frame: bytes) -> int:
        """Publish `frame` as chunks; returns the bytes handed to the broker (chunk headers included)."""
        self._send_seq += 1
        chunks = chunk_frame(frame, f"s{self._send_seq}-{int(time.time() * 1000) % 10**9}")
        for chunk in chunks:
            self.mqtt.publish(topic, chunk, qos=1)
        return sum(len(c) for c in chunks)
