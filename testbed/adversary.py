"""A malicious device for robustness experiments (host side; nothing of it goes onto a board).

    python -m testbed.adversary --config RUN/configs/dev4.toml --artifacts RUN/artifacts.json \
        --broker mqtt://127.0.0.1:PORT --scale -10

It is a device on the roster that trains honestly (ONNX Runtime, its own shard, the task's knobs)
and then uploads `base + scale x (trained - base)`: scale 1 is an honest device, -10 a sign-flipped
amplified attacker, 100 an amplified one. It speaks the wire protocol as the agent does (hello,
status, chunked frames) but keeps only what the experiment needs: dense tasks, one artifact.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import numpy.typing as npt

from runtime.chunks import Reassembler, chunk_frame
from runtime.device_config import load_device_config
from runtime.errors import OrchardError, TrainerError, exit_code, one_line
from runtime.frames import decode_task, encode_update
from runtime.mqtt import Message, MqttClient, MqttConfig
from runtime.protocol import Hello, ServerState, Status, Task, Topics, Update, decode_json, encode_json
from runtime.trainer import TrainConfig, Trainer


def run(config: Path, artifacts_json: Path, broker: str, scale: float) -> None:
    cfg = load_device_config(config, broker)
    spec = json.loads(artifacts_json.read_text())
    trainer = Trainer(artifacts_json.parent / spec["global"], threads=1)
    with np.load(cfg.shard) as shard:
        x, y = shard["x"].astype(np.float32), shard["y"].astype(np.int64)
    topics, me = Topics(cfg.root), cfg.device_id
    client = MqttClient(cfg.broker_url, MqttConfig(f"adversary-{me}-{uuid.uuid4().hex[:6]}", keepalive_s=10))
    client.connect()
    for topic in (topics.task(me), topics.server_state):
        client.subscribe(topic, qos=1)
    reassembler = Reassembler(timeout_s=60.0, max_bytes=256 * 1024 * 1024)
    greeted = False
    while True:
        event = client.get(1.0)
        if not isinstance(event, Message):
            continue
        if event.topic == topics.server_state:
            if event.payload and event.payload != b"offline":
                state = decode_json(ServerState, event.payload, source="server")
                if state.online and not greeted:
                    hello = Hello(me, "adversary", 1.0, 1024, "adversary", ("dense",), len(y), (), ())
                    client.publish(topics.hello(me), encode_json(hello), qos=1, wait_s=10)
                    client.publish(topics.status(me), encode_json(Status(me, "idle", time.time())), qos=1,
                                   retain=True, wait_s=10)
                greeted = state.online  # whoever started it stops it (SIGTERM) when the run is over
            continue
        frame = reassembler.feed(event.topic, event.payload)
        if frame is None:
            continue
        task = decode_task(frame, source="server")
        try:
            _answer(client, topics, me, trainer, task, x, y, scale)
        except TrainerError as exc:  # e.g. a NaN loss once the attack has wrecked the model
            failed = Status(me, "failed", time.time(), task.task_id, one_line(exc), "error")
            client.publish(topics.status(me), encode_json(failed), qos=1, retain=True, wait_s=10)


def _answer(client: MqttClient, topics: Topics, me: str, trainer: Trainer, task: Task,
            x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], scale: float) -> None:
    layout = trainer.layout
    base = layout.join({p.name: np.asarray(task.tensors[p.name]) for p in layout})
    t0 = time.perf_counter()
    result = trainer.train(base, x, y, TrainConfig(steps=task.local_steps, epochs=task.local_epochs or 1,
                                                   batch_size=task.batch_size, lr=task.lr))
    sent = (base.astype(np.float64) + scale * (result.weights.astype(np.float64) - base)).astype(np.float32)
    values = sent if task.upload == "weights" else (sent - base).astype(np.float32)
    upd = Update(task.task_id, me, task.base_version, len(y), time.perf_counter() - t0, result.peak_rss_mb, None,
                 task.upload, {}, layout.split(values))
    for chunk in chunk_frame(encode_update(upd), uuid.uuid4().hex):
        client.publish(topics.update(me), chunk, qos=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.adversary", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path, help="the device TOML of the id it takes")
    p.add_argument("--artifacts", required=True, type=Path, help="the run's artifacts.json (dense model)")
    p.add_argument("--broker", required=True)
    p.add_argument("--scale", type=float, default=-10.0, help="upload base + scale x (trained - base)")
    args = p.parse_args(argv)
    try:
        run(args.config, args.artifacts, args.broker, args.scale)
    except OrchardError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
