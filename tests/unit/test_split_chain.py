"""MP-SL over real TCP: compute nodes (threads here, one worker each) and owners, on real ORT parts."""

from __future__ import annotations

import time

import numpy as np
import pytest

from models.artifacts import ensure_artifacts
from models.builder import build
from models.split import ensure_part_artifacts, plan_parts
from models.structure import full_structure
from runtime.compute_node import ComputeNode
from runtime.errors import ProtocolError
from runtime.ort import OrtSession
from runtime.protocol import SplitMessage
from runtime.split import PartRunner, fedavg
from runtime.split_link import FrameStream
from runtime.split_owner import NodeLost, SplitOwner

BATCH, LR = 8, 0.05
CUTS = ["conv2", "conv4", "fc1"]  # P = 4: two compute nodes
SHAPE = (1, 16, 16)


@pytest.fixture
def chain(artifact_cache):
    structure = full_structure("cnn", SHAPE, 10)
    built = build(structure)
    dirs = ensure_part_artifacts(structure, CUTS, BATCH, artifact_cache)
    parts = plan_parts(built, CUTS, SHAPE)
    owners = ("own0", "own1")
    last = ComputeNode(str(dirs[2]), "127.0.0.1:0", owners, lr=LR)
    last.start()
    first = ComputeNode(str(dirs[1]), "127.0.0.1:0", owners, next_addr=f"127.0.0.1:{last.port}", lr=LR)
    first.start()
    agg = [FrameStream.connect(f"127.0.0.1:{n.port}") for n in (first, last)]
    for s in agg:
        s.send(SplitMessage("hello", "own0", 0, 0, note="aggregator"))
    yield structure, built, dirs, parts, owners, (first, last), agg
    for n in (first, last):
        n.stop()


def _owner(name, dirs, nodes, built, parts, timeout_s=10.0):
    head, tail = PartRunner(dirs[0]), PartRunner(dirs[-1])
    o = SplitOwner(name, head, tail, f"127.0.0.1:{nodes[0].port}", f"127.0.0.1:{nodes[1].port}", timeout_s)
    o.set_params(np.concatenate([built.init[a:b] for p in (parts[0], parts[-1]) for a, b in p.full_offsets]))
    o.set_lr(LR)
    return o


def test_two_owners_two_nodes_one_epoch_equals_fedavg_of_full_models(chain, artifact_cache):
    structure, built, dirs, parts, owners, nodes, agg = chain
    rng = np.random.default_rng(5)
    data = {k: [(rng.normal(size=(BATCH, *SHAPE)).astype(np.float32), rng.integers(0, 10, BATCH))
                for _ in range(2)] for k in owners}
    own = {k: _owner(k, dirs, nodes, built, parts) for k in owners}
    for b in range(2):  # interleaved, as concurrent owners would be
        for k in owners:
            x, y = data[k][b]
            own[k].train_step({"input": x, "labels": y})
    for k in owners:
        assert own[k].end_epoch() == 2
    middle = [agg[i].recv(10.0).tensors["x"] for i in range(2)]  # each node's average after the epoch
    ends = fedavg([own[k].get_params() for k in owners], [2, 2])
    n0 = parts[0].layout.total
    assembled = np.concatenate([ends[:n0], *middle, ends[n0:]])
    order = [o for p in parts for o in p.full_offsets]
    # The reference: each owner trains the whole model on its batches; FedAvg of the two.
    full = OrtSession(ensure_artifacts(structure, "sgd", artifact_cache).directory)
    full.set_lr(LR)
    trained = []
    for k in owners:
        full.set_params(built.init)
        for x, y in data[k]:
            full.train_step({"input": x, "labels": y})
        trained.append(full.get_params())
    ref = fedavg(trained, [1, 1])
    ref_in_part_order = np.concatenate([ref[a:b] for a, b in order])
    np.testing.assert_allclose(assembled, ref_in_part_order, atol=1e-4)
    assert np.abs(ref - built.init).max() > 1e-3


def test_wrong_shape_batch_or_owner_is_refused_one_line(chain):
    _structure, _built, _dirs, _parts, _owners, nodes, _agg = chain
    s = FrameStream.connect(f"127.0.0.1:{nodes[0].port}")
    s.send(SplitMessage("hello", "own0", 0, 0, note="owner"))
    assert s.recv(10.0).note == "ack"
    cases = [
        (SplitMessage("fwd", "own0", 0, 0, tensors={"x": np.zeros((BATCH, 32, 8, 9), np.float32)}), "wrong shape"),
        (SplitMessage("fwd", "own0", 0, 0, tensors={"x": np.zeros((3, 32, 8, 8), np.float32)}), "wrong batch"),
        (SplitMessage("fwd", "stranger", 0, 0, tensors={"x": np.zeros((BATCH, 32, 8, 8), np.float32)}),
         "unknown data owner 'stranger'"),
        (SplitMessage("bwd", "own0", 0, 7, tensors={"x": np.zeros((BATCH, 1024), np.float32)}),
         "no forward of that batch"),
    ]
    for msg, needle in cases:
        s.send(msg)
        reply = s.recv(10.0)
        assert reply.split_op == "error" and needle in reply.note and "\n" not in reply.note
    assert nodes[0].refused == len(cases)
    ok = np.zeros((BATCH, 32, 8, 8), np.float32)
    s.send(SplitMessage("fwd", "own0", 0, 0, tensors={"x": ok}))  # taken: its output goes on to node 2
    s.send(SplitMessage("fwd", "own0", 0, 1, tensors={"x": ok}))
    reply = s.recv(10.0)
    assert reply.split_op == "error" and "batch 0 is still in flight" in reply.note
    assert nodes[0].copies["own0"].tobytes() == nodes[0].copies["own1"].tobytes()  # nothing trained


def test_owner_refused_by_node_raises_one_line_and_keeps_weights(chain):
    _structure, built, dirs, parts, _owners, nodes, _agg = chain
    o = _owner("own0", dirs, nodes, built, parts)
    before = o.get_params()
    o.epoch = 3  # the nodes are in epoch 0: every frame of this owner is refused
    with pytest.raises(ProtocolError, match="refused batch 0: fwd frame of own0 for epoch 3"):
        o.train_step({"input": np.zeros((BATCH, *SHAPE), np.float32), "labels": np.zeros(BATCH, np.int64)})
    np.testing.assert_array_equal(o.get_params(), before)


def test_an_unknown_owner_is_refused_at_hello(chain):
    dirs, nodes = chain[2], chain[5]
    with pytest.raises(ProtocolError, match="refused it: unknown data owner 'nobody'") as exc:
        SplitOwner("nobody", PartRunner(dirs[0]), PartRunner(dirs[-1]), f"127.0.0.1:{nodes[0].port}",
                   f"127.0.0.1:{nodes[1].port}", timeout_s=10)
    assert "\n" not in str(exc.value)


def test_node_vanishing_mid_epoch_times_out_and_loses_nothing(chain):
    _structure, built, dirs, parts, _owners, nodes, _agg = chain
    o = _owner("own0", dirs, nodes, built, parts, timeout_s=1.0)
    rng = np.random.default_rng(1)
    feeds = {"input": rng.normal(size=(BATCH, *SHAPE)).astype(np.float32), "labels": rng.integers(0, 10, BATCH)}
    o.train_step(feeds)
    before = o.get_params()
    nodes[1].stop()  # the last node vanishes: the first still takes the activations
    t0 = time.monotonic()
    with pytest.raises(NodeLost, match="own0: compute node") as exc:
        o.train_step(feeds)
    assert time.monotonic() - t0 < 5.0 and "\n" not in str(exc.value)
    np.testing.assert_array_equal(o.get_params(), before)  # the failed batch left no trace


def test_split_frames_round_trip_and_refuse_bad_ops():
    from runtime.frames import decode_split, decode_update, encode_split

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    frame = encode_split(SplitMessage("bwd", "own3", 2, 7, 1.5, tensors={"x": x}))
    back = decode_split(frame, source="node1")
    assert (back.split_op, back.device_id, back.epoch, back.batch_index) == ("bwd", "own3", 2, 7)
    np.testing.assert_array_equal(back.tensors["x"], x)
    with pytest.raises(ProtocolError, match="field 'split_op' must be one of"):
        encode_split(SplitMessage("push", "own3", 0, 0))
    with pytest.raises(ProtocolError, match="expected 'update'"):
        decode_update(frame)
    with pytest.raises(ProtocolError, match="field 'device_id' must match"):
        encode_split(SplitMessage("fwd", "own 3", 0, 0))
    x[0, 0] = np.nan
    with pytest.raises(ProtocolError, match=r"not finite|non-finite|NaN"):
        encode_split(SplitMessage("fwd", "own3", 0, 0, tensors={"x": x}))
