"""An MP-SL data owner as a process (`python -m runtime.mpsl_owner CONFIG.json`), for `orchard mpsl
run`: it trains epoch after epoch, between the aggregator's broadcasts.

Per epoch: receive the aggregator's `weights` (M_1 | M_P; the whole model when the owner trains
it alone, the FedAvg baseline), train one local epoch through the device method seam (method
`mpsl` around a SplitOwner, or `fedavg` around the full model's session), send the trained
weights back with the sample count and a JSON report in `note`. A lost compute node is reported
to the aggregator as an `error` naming it; the owner keeps the weights it had before the epoch,
and a `weights` frame marked `fallback` (the whole model) switches it to FedAvg for good.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import OrchardError, TransportError
from runtime.methods import device_method, spec
from runtime.protocol import Assignment, SplitMessage
from runtime.split_link import FrameStream
from runtime.split_owner import SplitOwner
from runtime.trainer import TrainConfig, Trainer

X = "x"


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec, so a
    process started by a big parent (the harness holds the whole dataset) would report the parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _open(cfg: dict[str, Any], mode: str) -> tuple[Trainer, Any, str]:
    """The trainer, the backend it trains, and the method's name."""
    if mode == "fedavg":
        from runtime.ort import OrtSession

        backend: Any = OrtSession(cfg["full_dir"], threads=1)
        return Trainer.on_backend(backend, tuple(cfg["input_shape"]), int(cfg["num_classes"])), backend, "fedavg"
    from runtime.split import PartRunner

    backend = SplitOwner(cfg["owner_id"], PartRunner(cfg["part_dirs"][0]), PartRunner(cfg["part_dirs"][-1]),
                         cfg["first_node"], cfg["last_node"], float(cfg["timeout_s"]))
    return Trainer.on_backend(backend, tuple(cfg["input_shape"]), int(cfg["num_classes"])), backend, "mpsl"


def _opener(backend: Any) -> Any:
    """The one backend this owner trains, whatever key the assignment names."""
    return lambda key: backend


def run(cfg: dict[str, Any]) -> int:
    shard = np.load(cfg["shard"])
    x, y = shard["x"], shard["y"]
    agg = FrameStream.connect(cfg["aggregator"])
    agg.send(SplitMessage("hello", cfg["owner_id"], 0, 0, note="owner"))
    mode = cfg["mode"]
    trainer, backend, method_name = _open(cfg, mode)
    while True:
        msg = agg.recv(None)
        if msg.split_op != "weights":
            return 0  # the aggregator's epoch_end (or anything else): the run is over
        if msg.note == "fallback" and mode != "fedavg":
            # A compute node was lost: this owner can train the whole model, so it does (FedAvg).
            if isinstance(backend, SplitOwner):
                backend.close()
            mode = "fedavg"
            trainer, backend, method_name = _open(cfg, mode)
        params = spec(method_name).params(cfg.get("method_params") if method_name == "mpsl" else {})
        profile = "split" if method_name == "mpsl" else "dense"
        assignment = Assignment(method_name, profile, ("local",), spec(method_name).extras(profile, params))
        weights = msg.tensors.get(X)
        if not isinstance(weights, np.ndarray):
            agg.send(SplitMessage("error", cfg["owner_id"], msg.epoch, 0, note="weights frame without dense 'x'"))
            continue
        method = device_method(assignment, _opener(backend))
        tcfg = TrainConfig(epochs=1, batch_size=int(cfg["batch"]), lr=float(cfg["lr"]),
                           seed=int(cfg["seed"]) + msg.epoch)
        t0 = time.perf_counter()
        try:
            result = trainer.train(weights, x, y, tcfg, method=method)
        except (TransportError, OrchardError) as exc:
            agg.send(SplitMessage("error", cfg["owner_id"], msg.epoch, 0, note=str(exc)[:500]))
            continue
        rss_mb = peak_rss_mb()
        report = {"train_s": time.perf_counter() - t0, "peak_rss_mb": rss_mb, **method.report()}
        agg.send(SplitMessage("weights", cfg["owner_id"], msg.epoch, 0, time.time(), n_batches=result.n_samples,
                              note=json.dumps(report), tensors={X: result.weights}))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        return run(json.loads(Path(args[0]).read_text()))
    except OrchardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
