"""The wire schema shared by devices and the server: topics, messages, frames.

Control messages (hello, status, telemetry, server state) are JSON. Messages that carry tensors
(task, update, artifact) are binary *frames*: magic + version byte, a JSON header describing
every tensor and a SHA-256 of the body, then raw little-endian bytes. No pickle anywhere.

Version 3 seals every message on a device's topics (`runtime.seal`): an envelope bound to the
run id, the device and the message kind, with an HMAC-SHA256 under that device's key. Both
sides open it before decoding anything. The server answers each update with a `Receipt`
(accepted, or rejected with the reason) on `dev/<id>/receipt`; the device keeps the update in
its outbox until the receipt comes. A task names the manifest SHA-256 of every artifact it
needs (`artifact_digests`), and a device stores only an artifact whose manifest matches it.

This module is the import point for the message types and holds their JSON codec
(`encode_json` / `decode_json`, on the strict JSON layer of `runtime.wire_json`) and
`validate_tensors`. The binary frame and chunking live in
`runtime.frames` (it imports this module, never the other way round).

JSON messages are one flat object: the dataclass fields plus `"msg"` (the message kind) and
`"v"` (PROTOCOL_VERSION), keys sorted, no whitespace, so encoding is byte-stable. Decoding is
strict because a board or a server must never act on a half-understood message: required
fields present, no unknown fields, types exact (no bool for int, no float for int), every
number finite, integers >= 0 (all integer fields are counts, sizes or versions), states and
kinds from their closed sets, device ids and artifact keys safe to use in topics and paths.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

from runtime import wire_json
from runtime.errors import ConfigError, ProtocolError
from runtime.record import field, record
from runtime.wire_json import (
    context,
    dumps_canonical,
    fields_from_json,
    fields_to_json,
    loads_strict,
    show,
)

# Taken from here by modules written before the JSON layer moved to runtime.wire_json.
ID_PATTERN = wire_json.ID_PATTERN
NAME_PATTERN = wire_json.NAME_PATTERN

# numpy is imported where tensors are handled: the agent starts without it. The array aliases are
# numpy's for the type checker and Any at run time, so the wire dataclasses' hints still resolve.
if typing.TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Int64Array = npt.NDArray[np.int64]
    Float32Array = npt.NDArray[np.float32]
else:
    Int64Array = Float32Array = Any

# 2: Task carries an Assignment (method, profile, artifact keys, extras) and upload/encoding in
# place of profile/artifact_key/options; Update carries the method's report; Status a failure kind.
# 3: every dev/<id>/* message sealed (runtime.seal: run id, device, kind, HMAC-SHA256); Receipt;
# Task.artifact_digests.
PROTOCOL_VERSION = 3

JSON_MAX_BYTES = 1 << 20  # control messages are small; a bigger one is a bug or an attack


# ---------------------------------------------------------------- topics
TOPIC_ROOT_MAX = 200


def check_topic_root(root: str) -> str:
    """`root` if it can prefix every topic, else ConfigError. A wildcard in it (`+`, `#`) would
    make the server's subscription match other campaigns' topics, or everything."""
    if not isinstance(root, str) or not root:
        raise ConfigError(f"topic root {show(root)} must be a non-empty string")
    if len(root) > TOPIC_ROOT_MAX:
        raise ConfigError(f"topic root {show(root, 60)} is {len(root)} characters, more than {TOPIC_ROOT_MAX}")
    if "+" in root or "#" in root:
        raise ConfigError(f"topic root {root!r} holds an MQTT wildcard (+ or #)")
    if "\0" in root or root.startswith("/") or root.endswith("/") or "//" in root or root.startswith("$"):
        raise ConfigError(f"topic root {root!r} must be levels joined by '/', without NUL, '$' at the start, "
                          "empty levels or a leading or trailing '/'")
    return root


@record
class Topics:
    """Topic names under one campaign root, e.g. `orchard/default`."""

    root: str

    def __post_init__(self) -> None:
        check_topic_root(self.root)

    @property
    def server_state(self) -> str:
        return f"{self.root}/server/state"

    def hello(self, device_id: str) -> str:
        return f"{self.root}/dev/{device_id}/hello"

    def status(self, device_id: str) -> str:
        return f"{self.root}/dev/{device_id}/status"

    def telemetry(self, device_id: str) -> str:
        return f"{self.root}/dev/{device_id}/telemetry"

    def task(self, device_id: str) -> str:
        return f"{self.root}/dev/{device_id}/task"

    def update(self, device_id: str) -> str:
        return f"{self.root}/dev/{device_id}/update"

    def artifact(self, device_id: str) -> str:
        return f"{self.root}/dev/{device_id}/artifact"

    def receipt(self, device_id: str) -> str:
        return f"{self.root}/dev/{device_id}/receipt"

    @property
    def all_devices(self) -> str:
        return f"{self.root}/dev/+/+"


# ---------------------------------------------------------------- tensors
@record
class SparseTensor:
    """COO form of a tensor of `shape`: `values` at flat (row-major) `indices`; the rest is zero."""

    shape: tuple[int, ...]
    indices: Int64Array  # or int32: a decoded frame keeps its wire index type (frame_table.index_dtype)
    values: Float32Array


Tensor = Union[Float32Array, SparseTensor]


# ---------------------------------------------------------------- JSON messages
@record
class Hello:
    device_id: str
    board: str
    cores: float
    ram_mb: int
    runtime_version: str
    profiles: tuple[str, ...]  # profiles this device can run, e.g. ("dense", "width=0.5")
    n_samples: int
    label_histogram: tuple[int, ...]  # count per global class index
    artifacts: tuple[str, ...] = ()  # artifact keys already in the device's cache


@record
class Status:
    device_id: str
    state: str  # one of DEVICE_STATES
    t: float  # device wall clock, seconds since the epoch
    task_id: str | None = None
    detail: str = ""  # e.g. the cause of a failure: "trainer killed (exit 137, OOM)"
    failure: str | None = None  # one of FAILURES when state == "failed"


@record
class TelemetrySample:
    t: float
    state: str
    cpu_pct: float  # percent of the board's CPU quota in use
    rss_agent_mb: float
    rss_trainer_mb: float
    mem_limit_mb: float | None
    cpu_quota_cores: float | None
    power_w: float | None
    energy_j: float | None  # cumulative since the agent started
    temp_c: float | None = None
    # A Jetson's integrated GPU (runtime/jetson_gpu.py); absent elsewhere.
    gpu_pct: float | None = None
    gpu_mem_mb: float | None = None  # NvMapMemUsed: shared DRAM the GPU holds
    gpu_energy_j: float | None = None  # cumulative, of the INA3221 rail that feeds the GPU


@record
class Telemetry:
    device_id: str
    power_source: str  # e.g. "model", "rapl", "ina3221", "pmic"
    samples: tuple[TelemetrySample, ...]


@record
class Receipt:
    """The server's verdict on one update, so the device knows it may drop it from its outbox."""

    device_id: str
    task_id: str
    accepted: bool
    reason: str = ""  # why it was refused; empty when accepted


@record
class ServerState:
    server_id: str
    model_id: str
    version: int
    strategy: str
    online: bool = True


# ---------------------------------------------------------------- framed messages
@record
class Assignment:
    """What a device trains, as data: the method's name, its canonical profile, the artifacts
    (the first is the one whose layout the task's tensors and the update use; a method may need
    more, e.g. FjORD one per nested width) and the method's own extras (JSON values)."""

    method: str
    profile: str
    artifact_keys: tuple[str, ...]
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def primary_key(self) -> str:
        return self.artifact_keys[0]


@record
class Task:
    task_id: str
    round: int
    base_version: int
    model_id: str
    assignment: Assignment
    local_steps: int  # 0 means: use local_epochs
    local_epochs: int
    lr: float
    batch_size: int
    deadline_s: float  # seconds from receipt, in the device's own time (board s x the testbed's dilation); 0: none
    upload: str = "weights"  # weights | delta: the form the update should take
    encoding: str = "dense"  # dense | fp16: how the update's tensors travel
    tensors: Mapping[str, Tensor] = field(default_factory=dict)  # primary artifact's weights by name
    # Manifest SHA-256 of each artifact the task needs, by key: a pushed artifact is stored only
    # if its manifest has exactly this hash.
    artifact_digests: Mapping[str, str] = field(default_factory=dict)


@record
class Update:
    task_id: str
    device_id: str
    base_version: int
    n_samples: int
    train_s: float
    peak_rss_mb: float
    energy_j: float | None
    kind: str  # "weights" | "delta"
    metrics: Mapping[str, float] = field(default_factory=dict)
    tensors: Mapping[str, Tensor] = field(default_factory=dict)  # sparse ones carry only what was sent
    report: Mapping[str, float] = field(default_factory=dict)  # the method's own figures




@record
class SplitMessage:
    """MP-SL traffic between a data owner and the compute nodes (methods.md §4.2): activations
    downstream (`fwd`), gradients upstream (`bwd`), one tensor `x` each; `hello` says who a
    connection is (`note`: owner | node | aggregator), `epoch_end` closes an owner's epoch
    (`n_batches`), `weights` carries a node's averaged part, `error` a refusal (`note`: why)."""

    split_op: str
    device_id: str  # the data owner the batch belongs to (the sender, for hello)
    epoch: int
    batch_index: int
    sent_s: float = 0.0  # sender's wall clock, for the node's queue targets
    n_batches: int = 0
    note: str = ""
    tensors: Mapping[str, Tensor] = field(default_factory=dict)


@record
class Artifact:
    key: str
    files: Mapping[str, bytes]  # file name -> bytes (training/eval/optimizer models, checkpoint, manifest)


# ---------------------------------------------------------------- JSON schema
JsonMessage = Union[Hello, Status, Telemetry, ServerState, Receipt]
J = TypeVar("J", Hello, Status, Telemetry, ServerState, Receipt)

_JSON_KINDS: dict[type, str] = {
    Hello: "hello",
    Status: "status",
    Telemetry: "telemetry",
    ServerState: "server_state",
    Receipt: "receipt",
}


def encode_json(msg: JsonMessage) -> bytes:
    """Hello / Status / Telemetry / ServerState -> canonical UTF-8 JSON bytes."""
    kind = _JSON_KINDS.get(type(msg))
    if kind is None:
        raise ProtocolError(f"encode_json: {type(msg).__name__} is not a JSON message (frames carry tensors)")
    ctx = f"encoding {kind} message"
    obj = fields_to_json(msg, ctx)
    obj.update(msg=kind, v=PROTOCOL_VERSION)
    return dumps_canonical(obj, ctx)


def decode_json(cls: type[J], data: bytes | bytearray | memoryview, *, source: str = "",
                max_bytes: int = JSON_MAX_BYTES) -> J:
    """Parse and validate one JSON message of type `cls`.

    `source` (device id or topic) names the sender in error messages.
    """
    kind = _JSON_KINDS.get(cls)
    if kind is None:  # a programming error, not bad input
        raise TypeError(f"decode_json: {cls!r} is not a JSON message type")
    ctx = context(f"{kind} message", source)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{ctx}: payload must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ProtocolError(f"{ctx}: {len(data)} bytes exceeds the limit of {max_bytes}")
    obj = loads_strict(data, ctx)
    if not isinstance(obj, dict):
        raise ProtocolError(f"{ctx}: must be a JSON object, got {show(obj)}")
    got_kind = obj.pop("msg", None)
    if got_kind != kind:
        raise ProtocolError(f"{ctx}: field 'msg' must be {kind!r}, got {show(got_kind)}")
    version = obj.pop("v", None)
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(f"{ctx}: protocol version {show(version)}, this side speaks {PROTOCOL_VERSION}")
    return cls(**fields_from_json(cls, obj, ctx))


# ---------------------------------------------------------------- layout check
def validate_tensors(
    tensors: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    source: str = "",
    allow_missing: bool = False,
) -> None:
    """Check tensor names, shapes and dtypes against a layout (expected shape by name).

    The server calls this with `{p.name: p.shape for p in layout}` of the (sub)model it sent.
    Unknown names are always an error; missing ones only unless `allow_missing` (masked or
    top-k updates may omit tensors). Values were already checked finite by the frame decoder.
    """
    import numpy as np

    ctx = context("tensors", source)
    for name, tensor in tensors.items():
        if name not in expected:
            raise ProtocolError(f"{ctx}: unknown tensor {name!r} (layout has {show(sorted(expected), 120)})")
        want = tuple(expected[name])
        if isinstance(tensor, SparseTensor):
            shape = tuple(tensor.shape)
            ok = tensor.values.dtype == np.float32 and tensor.indices.dtype in (np.int32, np.int64)
            dtype = f"{tensor.indices.dtype}/{tensor.values.dtype}"
        elif isinstance(tensor, np.ndarray):
            shape, ok, dtype = tuple(tensor.shape), tensor.dtype == np.float32, str(tensor.dtype)
        else:
            raise ProtocolError(f"{ctx}: tensor {name!r} is a {type(tensor).__name__}, not an array")
        if shape != want:
            raise ProtocolError(f"{ctx}: tensor {name!r} has shape {shape}, layout expects {want}")
        if not ok:
            raise ProtocolError(f"{ctx}: tensor {name!r} has dtype {dtype}, expected float32 (int32 or int64 indices)")
    if not allow_missing:
        missing = [n for n in expected if n not in tensors]
        if missing:
            count = f"{len(missing)} of {len(expected)} missing"
            raise ProtocolError(f"{ctx}: missing tensor {missing[0]!r} ({count})")
