"""An MP-SL data owner's training backend: M_1 and M_P here, the middle on compute nodes.

`train_step` is the per-batch protocol of methods.md §4.2: forward M_1, send the activations to
the first node, wait for the last node's output, loss and step on M_P, send dL/d(output) to the
last node, wait for the first node's input gradient, step M_1. So the trainer loop and the
device method seam drive it like any other backend; its parameters are M_1 then M_P, named as
in the full model. A node that does not answer within `timeout_s` raises `NodeLost`, naming it;
the owner's weights are then those before the failed batch, never half-stepped.
"""

from __future__ import annotations

import select
import socket
import time

import numpy as np
import numpy.typing as npt

from runtime.backend import INPUT, LABELS, LOSS, Feeds, Outputs
from runtime.errors import ProtocolError, TrainerError, TransportError
from runtime.layout import FloatArray, ParamLayout, ParamSpec
from runtime.protocol import SplitMessage
from runtime.split import PartRunner
from runtime.split_link import FrameStream

X = "x"


class NodeLost(TransportError):
    """A compute node did not answer in time, or its connection broke."""


def owner_layout(head: PartRunner, tail: PartRunner) -> ParamLayout:
    specs, off = [], 0
    for runner in (head, tail):
        for p in runner.session.layout.params:
            if p.kind == "probe":
                continue
            specs.append(ParamSpec(name=p.name, shape=p.shape, offset=off, axes=p.axes, kind=p.kind))
            off += p.size
    return ParamLayout(params=tuple(specs), groups=dict(head.session.layout.groups))


class SplitOwner:
    def __init__(self, owner_id: str, head: PartRunner, tail: PartRunner, first_node: str, last_node: str,
                 timeout_s: float = 30.0) -> None:
        if not head.first or not tail.last:
            raise TrainerError(f"owner {owner_id}: needs the first and the last part, "
                               f"got parts {head.index}, {tail.index}")
        self.owner_id = owner_id
        self.head, self.tail = head, tail
        self.layout = owner_layout(head, tail)
        self.batch = head.batch
        self.timeout_s = timeout_s
        self.epoch = 0
        self.batch_index = 0
        self.bytes_sent = 0
        self.wait_s = 0.0  # time spent waiting on the compute nodes
        self.first = FrameStream.connect(first_node)
        self.last = self.first if last_node == first_node else FrameStream.connect(last_node)
        for s in {id(self.first): self.first, id(self.last): self.last}.values():
            s.send(SplitMessage("hello", owner_id, 0, 0, note="owner"))
            try:
                ack = s.recv(timeout_s)
            except socket.timeout:
                raise NodeLost(f"owner {owner_id}: compute node {s.peer} did not answer its hello "
                               f"within {timeout_s:g} s") from None
            if ack.split_op != "hello" or ack.note != "ack":
                raise ProtocolError(f"owner {owner_id}: compute node {s.peer} refused it: {ack.note or ack.split_op}")

    # ------------------------------------------------------------ TrainingBackend
    def get_params(self) -> FloatArray:
        return np.concatenate([self.head.weights(), self.tail.weights()])

    def set_params(self, flat: npt.NDArray[np.float32]) -> None:
        arr = self.layout.check(flat)
        n = self.head.weights_total
        self.head.load(arr[:n])
        self.tail.load(arr[n:])

    def set_lr(self, lr: float) -> None:
        self.head.set_lr(lr)
        self.tail.set_lr(lr)

    def eval_step(self, feeds: Feeds) -> Outputs:
        raise TrainerError("an MP-SL owner holds only M_1 and M_P; the aggregator scores the assembled model")

    def _fill(self, feeds: Feeds) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        """The probes fix the batch size: a short last batch is filled by repeating its samples."""
        x = np.asarray(feeds[INPUT], dtype=np.float32)
        y = np.asarray(feeds[LABELS], dtype=np.int64)
        if len(y) == self.batch:
            return x, y
        idx = np.resize(np.arange(len(y)), self.batch)
        return x[idx], y[idx]

    def _await(self, stream: FrameStream, op: str) -> FloatArray:
        t0 = time.perf_counter()
        try:
            # A refusal comes back from whichever node refused: watch both ends of the chain.
            ready, _, _ = select.select([self.first.sock, self.last.sock], [], [], self.timeout_s)
            if not ready:
                raise socket.timeout
            if self.first.sock in ready and self.first is not stream:
                stream = self.first
            msg = stream.recv(self.timeout_s)
        except socket.timeout:
            raise NodeLost(f"owner {self.owner_id}: compute node {stream.peer} sent no {op} for batch "
                           f"{self.batch_index} of epoch {self.epoch} within {self.timeout_s:g} s") from None
        except TransportError as exc:
            raise NodeLost(f"owner {self.owner_id}: compute node lost during batch {self.batch_index}: {exc}") from None
        self.wait_s += time.perf_counter() - t0
        if msg.split_op == "error":
            raise ProtocolError(f"owner {self.owner_id}: compute node {stream.peer} refused batch "
                                f"{self.batch_index}: {msg.note}")
        if (msg.split_op, msg.device_id, msg.epoch, msg.batch_index) != (op, self.owner_id, self.epoch,
                                                                          self.batch_index):
            raise ProtocolError(f"owner {self.owner_id}: expected {op} of batch {self.batch_index} epoch {self.epoch}, "
                                f"got {msg.split_op} of {msg.device_id} batch {msg.batch_index} epoch {msg.epoch}")
        x = msg.tensors.get(X)
        if not isinstance(x, np.ndarray):
            raise ProtocolError(f"owner {self.owner_id}: {op} frame carries no dense tensor 'x'")
        return x

    def train_step(self, feeds: Feeds) -> Outputs:
        x, y = self._fill(feeds)
        snapshot = self.get_params()
        try:
            a1 = self.head.forward(x)
            self.bytes_sent += self.first.send(self._msg("fwd", a1))
            out = self._await(self.last, "fwd")
            self.tail.check_batch("output of the last node", out, self.tail.in_shape)
            loss, _, g_out = self.tail.train_last(out, y)
            self.bytes_sent += self.last.send(self._msg("bwd", g_out))
            g1 = self._await(self.first, "bwd")
            self.head.check_batch("input gradient", g1, self.head.out_shape)
            self.head.backward(x, g1)
        except (TransportError, ProtocolError):
            self.set_params(snapshot)  # never half-stepped: M_P may have moved already
            raise
        self.batch_index += 1
        return {LOSS: np.asarray(loss, dtype=np.float32)}

    def _msg(self, op: str, x: FloatArray) -> SplitMessage:
        return SplitMessage(op, self.owner_id, self.epoch, self.batch_index, time.time(), tensors={X: x})

    # ------------------------------------------------------------ epochs
    def end_epoch(self) -> int:
        """Tell the chain this owner's epoch is over (the nodes average when all owners have); the
        number of batches it trained."""
        n = self.batch_index
        self.first.send(SplitMessage("epoch_end", self.owner_id, self.epoch, n, time.time(), n_batches=n))
        self.epoch += 1
        self.batch_index = 0
        return n

    def restart_epoch(self, epoch: int) -> None:
        self.epoch, self.batch_index = epoch, 0

    def close(self) -> None:
        self.first.close()
        if self.last is not self.first:
            self.last.close()
