"""`orchard compute-node`: one MP-SL compute node (methods.md §4.1-4.4).

It holds one middle part and a separate copy of it for every data owner (parallel SL; with plain
SGD a copy is the weights alone: ORT's SGD keeps no optimizer state). One worker drains a queue
of forward and backward tasks from all owners with the EDF-like policy of `runtime.split_queue`,
so node i works on owner k while node i+1 works on owner k'. ORT steps inside the backward call,
so the authors' separate `optimize` task is folded into it. When every owner has closed an
epoch, the node FedAvgs its copies (weighted by batches) and pushes the average to connected
aggregators.

Connections (runtime.split_link, one `hello` first): owners connect to the first node (their
activations come in, input gradients go back) and to the last one (outputs go back, loss
gradients come in); node i connects to node i+1. A frame with the wrong shape, batch or owner is
refused with one line, logged and sent back to its sender as an `error`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import numpy as np

from runtime.errors import OrchardError, ProtocolError, TransportError, one_line
from runtime.layout import FloatArray
from runtime.protocol import SplitMessage
from runtime.record import record
from runtime.split import PartRunner, fedavg
from runtime.split_link import FrameStream, parse_addr
from runtime.split_queue import EdfQueue

log = logging.getLogger("orchard.compute_node")
X = "x"  # the one tensor of a fwd/bwd/weights message


@record
class _Task:
    msg: SplitMessage
    source: FrameStream


class ComputeNode:
    def __init__(self, part_dir: str, listen: str, owners: tuple[str, ...], next_addr: str | None = None,
                 lr: float = 0.01, threads: int = 1) -> None:
        if not owners:
            raise ProtocolError("a compute node needs at least one data owner id")
        self.runner = PartRunner(part_dir, threads)
        if self.runner.first or self.runner.last:
            raise ProtocolError(f"{part_dir}: part {self.runner.index} of {self.runner.count} is an owner's part, "
                                "not a middle one")
        self.runner.set_lr(lr)
        self.owners = owners
        self.listen = listen
        self.next_addr = next_addr
        init = self.runner.weights()
        self.copies: dict[str, FloatArray] = {k: init.copy() for k in owners}
        self._loaded: str | None = None
        self._stash: dict[tuple[str, int, int], FloatArray] = {}  # (owner, epoch, batch) -> input kept for backward
        self._up: dict[str, FrameStream] = {}  # where each owner's forwards come from
        self._owner_conn: dict[str, FrameStream] = {}
        self._aggregators: list[FrameStream] = []
        self._down: FrameStream | None = None
        self._ended: dict[str, int] = {}
        self.epoch = 0
        self.queue: EdfQueue[_Task] = EdfQueue()
        self._stop = threading.Event()
        self._server: socket.socket | None = None
        self.refused = 0
        self.tasks_done = 0

    # ------------------------------------------------------------ network
    def start(self) -> None:
        host, port = parse_addr(self.listen)
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            srv.bind((host, port))
        except OSError as exc:
            raise TransportError(f"compute node cannot listen on {self.listen}: {exc}") from None
        srv.listen(64)
        self._server = srv
        if self.next_addr is not None:
            self._down = FrameStream.connect(self.next_addr)
            self._down.send(SplitMessage("hello", self.owners[0], 0, 0, note="node"))
            threading.Thread(target=self._reader, args=(self._down,), daemon=True).start()
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._worker, daemon=True).start()
        log.info("compute node part %d on %s for owners %s", self.runner.index, self.listen, ",".join(self.owners))

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.getsockname()[1])

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()
        for s in [*self._owner_conn.values(), *self._up.values(), *self._aggregators,
                  *([self._down] if self._down else [])]:
            s.close()
        self.queue.wake()

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                sock, peer = self._server.accept()
            except OSError:
                return
            stream = FrameStream(sock, f"{peer[0]}:{peer[1]}")
            threading.Thread(target=self._reader, args=(stream,), daemon=True).start()

    def _reader(self, stream: FrameStream) -> None:
        while not self._stop.is_set():
            try:
                msg = stream.recv()
            except ProtocolError as exc:  # a malformed frame: refused, the connection kept
                self._refuse(stream, None, str(exc))
                continue
            except (TransportError, OSError):
                return
            if msg.split_op == "hello":
                self._hello(stream, msg)
            elif msg.split_op == "error":  # a refusal downstream: pass it up to the owner, never answer it
                log.warning("node downstream refused %s batch %d: %s", msg.device_id, msg.batch_index, msg.note)
                up = self._up.get(msg.device_id)
                if up is not None and up is not stream:
                    up.send(msg)
            else:
                target = None if msg.split_op in ("epoch_end", "weights") else time.time()
                self.queue.put(_Task(msg, stream), target)

    def _hello(self, stream: FrameStream, msg: SplitMessage) -> None:
        if msg.note == "owner":
            if msg.device_id not in self.copies:
                self._refuse(stream, msg, f"unknown data owner {msg.device_id!r}")
                return
            self._owner_conn[msg.device_id] = stream
            # The owner waits for this before its first batch: without it the last node could get
            # the owner's first activations (via the chain) before it knows where to send the output.
            stream.send(SplitMessage("hello", msg.device_id, 0, 0, note="ack"))
        elif msg.note == "aggregator":
            self._aggregators.append(stream)

    def _refuse(self, stream: FrameStream, msg: SplitMessage | None, why: str) -> None:
        self.refused += 1
        log.warning("refused frame from %s: %s", stream.peer, why)
        owner = msg.device_id if msg is not None else self.owners[0]
        with contextlib.suppress(OrchardError):  # the sender may be gone already
            stream.send(SplitMessage("error", owner, msg.epoch if msg else 0, msg.batch_index if msg else 0,
                                     note=why[:500]))

    # ------------------------------------------------------------ work
    def _ready(self, task: _Task) -> bool:
        # Only the next epoch waits (for this one's average); anything further off is refused in _run.
        return task.msg.split_op == "weights" or task.msg.epoch != self.epoch + 1

    def _worker(self) -> None:
        while not self._stop.is_set():
            task = self.queue.get(0.5, self._ready)
            if task is None:
                continue
            try:
                self._run(task)
            except ProtocolError as exc:
                self._refuse(task.source, task.msg, str(exc))
            except OrchardError as exc:
                log.warning("task %s of %s failed: %s", task.msg.split_op, task.msg.device_id, exc)
            self.tasks_done += 1

    def _load(self, owner: str) -> None:
        if self._loaded != owner:
            self.runner.load(self.copies[owner])
            self._loaded = owner

    def _run(self, task: _Task) -> None:
        msg, k = task.msg, task.msg.device_id
        if msg.split_op == "weights":  # the aggregator (re)sets every copy: a fresh or retried epoch
            w = self._tensor(msg, (self.runner.weights_total,))
            self.copies = {o: w.copy() for o in self.owners}
            self._loaded, self.epoch = None, msg.epoch
            self._stash.clear()
            self._ended.clear()
            return
        if k not in self.copies:
            raise ProtocolError(f"{msg.split_op} frame for unknown data owner {k!r}")
        if msg.epoch != self.epoch:
            raise ProtocolError(f"{msg.split_op} frame of {k} for epoch {msg.epoch}, node is in epoch {self.epoch}")
        if msg.split_op == "fwd":
            x = self._tensor(msg, (self.runner.batch, *self.runner.in_shape))
            # An owner waits for its batch's backward before the next (§4.3): one input per owner
            # is all a node ever keeps, so a second one in flight is refused, not stored.
            pending = [b for (o, _, b) in self._stash if o == k and b != msg.batch_index]
            if pending:
                raise ProtocolError(f"fwd frame of {k} batch {msg.batch_index}: batch {pending[0]} is still in flight")
            self._load(k)
            out = self.runner.forward(x)
            self._stash[(k, msg.epoch, msg.batch_index)] = x
            self._up[k] = task.source
            self._send_down(k, SplitMessage("fwd", k, msg.epoch, msg.batch_index, time.time(), tensors={X: out}))
        elif msg.split_op == "bwd":
            g = self._tensor(msg, (self.runner.batch, *self.runner.out_shape))
            x_in = self._stash.pop((k, msg.epoch, msg.batch_index), None)
            if x_in is None:
                raise ProtocolError(f"bwd frame of {k} for batch {msg.batch_index}: no forward of that batch here")
            self._load(k)
            g_in = self.runner.backward(x_in, g)
            assert g_in is not None
            self.copies[k] = self.runner.weights()
            self._up[k].send(SplitMessage("bwd", k, msg.epoch, msg.batch_index, time.time(), tensors={X: g_in}))
        elif msg.split_op == "epoch_end":
            self._ended[k] = msg.n_batches
            if self._down is not None:
                self._down.send(msg)
            if set(self._ended) == set(self.owners):
                self._average()
        else:
            raise ProtocolError(f"a compute node takes no {msg.split_op!r} frame")

    def _tensor(self, msg: SplitMessage, shape: tuple[int, ...]) -> FloatArray:
        x = msg.tensors.get(X)
        if not isinstance(x, np.ndarray) or set(msg.tensors) != {X}:
            raise ProtocolError(f"{msg.split_op} frame of {msg.device_id} must carry exactly one dense tensor 'x'")
        if tuple(x.shape) != shape:
            what = "batch" if x.shape[:1] != shape[:1] else "shape"
            raise ProtocolError(f"{msg.split_op} frame of {msg.device_id} batch {msg.batch_index}: wrong {what}, "
                                f"tensor 'x' has shape {tuple(x.shape)}, part {self.runner.index} expects {shape}")
        return x

    def _send_down(self, owner: str, msg: SplitMessage) -> None:
        if self._down is not None:
            self._down.send(msg)
            return
        conn = self._owner_conn.get(owner)
        if conn is None:
            raise TransportError(f"last node has no connection from owner {owner!r} to send its output to")
        conn.send(msg)

    def _average(self) -> None:
        counts = [self._ended[o] for o in self.owners]
        if sum(counts) > 0:
            avg = fedavg([self.copies[o] for o in self.owners], counts)
            self.copies = {o: avg.copy() for o in self.owners}
        self._loaded = None
        log.info("epoch %d: averaged %d copies of part %d", self.epoch, len(self.owners), self.runner.index)
        out = SplitMessage("weights", self.owners[0], self.epoch, self.runner.index, time.time(),
                           n_batches=sum(counts), tensors={X: self.copies[self.owners[0]]})
        self.epoch += 1
        self._ended.clear()
        self._stash.clear()
        for agg in list(self._aggregators):
            try:
                agg.send(out)
            except TransportError:
                self._aggregators.remove(agg)
        self.queue.wake()


def serve(part_dir: str, listen: str, owners: tuple[str, ...], next_addr: str | None, lr: float,
          threads: int) -> None:
    """Run a compute node until interrupted (the command line's `orchard compute-node`)."""
    node = ComputeNode(part_dir, listen, owners, next_addr, lr, threads)
    node.start()
    try:
        while True:
            time.sleep(3600)
    finally:
        node.stop()


def main(argv: list[str] | None = None) -> int:
    """`orchard compute-node` / `python -m runtime.compute_node` (no testbed or onnx imported, so
    its memory is the node's own)."""
    import argparse
    import sys

    from runtime.errors import exit_code

    p = argparse.ArgumentParser(prog="orchard compute-node", description="Run one MP-SL compute node.")
    p.add_argument("--part", required=True, help="artifact directory of the middle part it holds")
    p.add_argument("--listen", required=True, help="host:port to accept owners and the previous node on")
    p.add_argument("--owners", required=True, help="comma-separated data owner ids (one part copy each)")
    p.add_argument("--next", dest="next_addr", help="host:port of the next compute node (none: this is the last)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        serve(args.part, args.listen, tuple(o for o in args.owners.split(",") if o), args.next_addr, args.lr,
              args.threads)
    except OrchardError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
