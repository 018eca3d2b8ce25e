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

This module is the import point for the message types and holds the JSON codec
(`encode_json` / `decode_json`) and `validate_tensors`. The binary frame and chunking live in
`runtime.frames` (it imports this module, never the other way round).

JSON messages are one flat object: the dataclass fields plus `"msg"` (the message kind) and
`"v"` (PROTOCOL_VERSION), keys sorted, no whitespace, so encoding is byte-stable. Decoding is
strict because a board or a server must never act on a half-understood message: required
fields present, no unknown fields, types exact (no bool for int, no float for int), every
number finite, integers >= 0 (all integer fields are counts, sizes or versions), states and
kinds from their closed sets, device ids and artifact keys safe to use in topics and paths.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

from runtime.errors import ConfigError, ProtocolError
from runtime.typehints import type_hints

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

DEVICE_STATES = ("online", "idle", "training", "uploading", "offline", "failed")
UPDATE_KINDS = ("weights", "delta")
# Why a task failed, so the server never guesses from free text: the trainer was killed under a
# memory cap or raised MemoryError (oom), killed by another signal (killed), anything else (error).
FAILURES = ("oom", "killed", "error")
UPLOAD_ENCODINGS = ("dense", "fp16")
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


@dataclass(frozen=True)
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
@dataclass(frozen=True)
class SparseTensor:
    """COO form of a tensor of `shape`: `values` at flat (row-major) `indices`; the rest is zero."""

    shape: tuple[int, ...]
    indices: Int64Array
    values: Float32Array


Tensor = Union[Float32Array, SparseTensor]


# ---------------------------------------------------------------- JSON messages
@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Status:
    device_id: str
    state: str  # one of DEVICE_STATES
    t: float  # device wall clock, seconds since the epoch
    task_id: str | None = None
    detail: str = ""  # e.g. the cause of a failure: "trainer killed (exit 137, OOM)"
    failure: str | None = None  # one of FAILURES when state == "failed"


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Telemetry:
    device_id: str
    power_source: str  # e.g. "model", "rapl", "ina3221", "pmic"
    samples: tuple[TelemetrySample, ...]


@dataclass(frozen=True)
class Receipt:
    """The server's verdict on one update, so the device knows it may drop it from its outbox."""

    device_id: str
    task_id: str
    accepted: bool
    reason: str = ""  # why it was refused; empty when accepted


@dataclass(frozen=True)
class ServerState:
    server_id: str
    model_id: str
    version: int
    strategy: str
    online: bool = True


# ---------------------------------------------------------------- framed messages
@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


SPLIT_OPS = ("hello", "fwd", "bwd", "epoch_end", "weights", "error")


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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
_INT_MAX = 2**63 - 1  # every integer must fit an int64 on the other side (numpy, C)
_MAX_INT_DIGITS = 20  # "-9223372036854775808"; also keeps Python's 4300-digit ValueError away
_MAX_FREE_DEPTH = 32  # nesting allowed in free-form values (Assignment.extras); deeper breaks re-encoding

# Device ids become topic levels (no "/", "+", "#"); message ids become dict keys in chunks.
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Artifact keys and artifact file names become paths on the device: no separators, no leading dot.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=,+-]{0,127}")

_FIELD_CHOICES: dict[str, tuple[str, ...]] = {"state": DEVICE_STATES, "kind": UPDATE_KINDS, "upload": UPDATE_KINDS,
                                              "encoding": UPLOAD_ENCODINGS, "failure": FAILURES,
                                              "split_op": SPLIT_OPS}
_FIELD_PATTERNS: dict[str, re.Pattern[str]] = {
    "device_id": ID_PATTERN,
    "key": NAME_PATTERN,
    "method": ID_PATTERN,
}
_ELEMENT_PATTERNS: dict[str, re.Pattern[str]] = {"artifact_keys": NAME_PATTERN}


def show(value: object, limit: int = 60) -> str:
    """repr() capped in length, so an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def context(what: str, source: str) -> str:
    """Error-message prefix: "update frame from dev3" or just "update frame"."""
    return f"{what} from {source}" if source else what


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e400" parses to inf without this
        raise ValueError(f"non-finite number {text[:30]}")
    return value


def _parse_int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS:
        raise ValueError(f"integer with {len(text)} digits")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # json.loads would silently keep the last one
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads_strict(data: bytes | bytearray | memoryview, ctx: str) -> Any:
    """Parse UTF-8 JSON, rejecting NaN/Infinity, duplicate keys and absurd integers."""
    try:
        text = bytes(data).decode("utf-8")
        return json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_parse_float,
            parse_int=_parse_int,
            object_pairs_hook=_unique_keys,
        )
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{ctx}: JSON is not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise ProtocolError(f"{ctx}: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and the hooks above
        raise ProtocolError(f"{ctx}: bad JSON: {exc}") from None


def dumps_canonical(obj: Any, ctx: str) -> bytes:
    """Sorted keys, no whitespace, no NaN: the same message always gives the same bytes."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # unserialisable value, NaN, lone surrogate
        raise ProtocolError(f"{ctx}: not encodable as JSON: {exc}") from None


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return type_hints(cls)


# Optional fields added within protocol version 2: left out when None, so a message without them
# keeps its bytes and a peer from before them still reads it (a Jetson's GPU figures).
_OMITTED_WHEN_NONE = frozenset({"gpu_pct", "gpu_mem_mb", "gpu_energy_j"})


def _plain(value: Any, path: str, ctx: str) -> Any:
    """Dataclasses, mappings and tuples -> JSON-ready dicts and lists; numpy scalars -> Python."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [f for f in dataclasses.fields(value)
                  if not (f.name in _OMITTED_WHEN_NONE and getattr(value, f.name) is None)]
        return {f.name: _plain(getattr(value, f.name), f"{path}.{f.name}", ctx) for f in fields}
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):  # json.dumps would turn 1 into "1" without a word
                raise ProtocolError(f"{ctx}: field '{path}' has non-string key {show(key)}")
        return {k: _plain(v, f"{path}[{k!r}]", ctx) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
    numpy = sys.modules.get("numpy")  # a numpy scalar exists only once numpy is imported
    if numpy is not None and isinstance(value, numpy.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(f"{ctx}: field '{path}' must be a finite number, got {value}")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion (a server re-encodes it later)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > _MAX_FREE_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _check(hint: Any, value: Any, path: str, ctx: str) -> Any:
    """Check one parsed JSON value against a field's type hint; return it in the field's type."""

    def bad(expected: str) -> ProtocolError:
        return ProtocolError(f"{ctx}: field '{path}' must be {expected}, got {show(value)}")

    if hint is Any:  # free-form (Assignment.extras): strict-parsed already, so only the depth is left
        if _depth(value) > _MAX_FREE_DEPTH:
            raise bad(f"nested at most {_MAX_FREE_DEPTH} deep")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape
            raise bad("valid Unicode text") from None
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        if not 0 <= value <= _INT_MAX:
            raise bad(f"an integer in [0, {_INT_MAX}]")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union or origin is getattr(types, "UnionType", Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(inner, value, path, ctx)
    if origin is tuple:
        if not isinstance(value, list):
            raise bad("a list")
        return tuple(_check(args[0], v, f"{path}[{i}]", ctx) for i, v in enumerate(value))
    if origin is Mapping:
        if not isinstance(value, dict):
            raise bad("an object")
        return {k: _check(args[1], v, f"{path}[{k!r}]", ctx) for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint(**fields_from_json(hint, value, ctx, path=path))
    raise TypeError(f"protocol schema has no rule for type {hint!r}")  # a bug here, not bad input


def fields_from_json(
    cls: type, obj: Any, ctx: str, *, exclude: frozenset[str] = frozenset(), path: str = ""
) -> dict[str, Any]:
    """Validate a JSON object against dataclass `cls` (minus `exclude`); return constructor kwargs."""
    prefix = f"{path}." if path else ""
    if not isinstance(obj, dict):
        where = f"field '{path}'" if path else "message"
        raise ProtocolError(f"{ctx}: {where} must be a JSON object, got {show(obj)}")
    fields = [f for f in dataclasses.fields(cls) if f.name not in exclude]
    unknown = sorted(set(obj) - {f.name for f in fields})
    if unknown:
        raise ProtocolError(f"{ctx}: unknown field '{prefix}{unknown[0]}'")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields:
        name = prefix + f.name
        if f.name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{ctx}: missing required field '{name}'")
            continue
        value = _check(hints[f.name], obj[f.name], name, ctx)
        choices = _FIELD_CHOICES.get(f.name)
        if choices is not None and value is not None and value not in choices:
            allowed = ", ".join(choices)
            raise ProtocolError(f"{ctx}: field '{name}' must be one of {allowed}, got {show(value)}")
        pattern = _FIELD_PATTERNS.get(f.name)
        if pattern is not None and not pattern.fullmatch(value):
            raise ProtocolError(f"{ctx}: field '{name}' must match {pattern.pattern}, got {show(value)}")
        element = _ELEMENT_PATTERNS.get(f.name)
        if element is not None:
            if not value:
                raise ProtocolError(f"{ctx}: field '{name}' must not be empty")
            for i, item in enumerate(value):
                if not element.fullmatch(item):
                    raise ProtocolError(f"{ctx}: field '{name}[{i}]' must match {element.pattern}, got {show(item)}")
        kwargs[f.name] = value
    return kwargs


def fields_to_json(msg: Any, ctx: str, *, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The JSON object for `msg`'s fields (minus `exclude`), validated exactly as a receiver would.

    Round-tripping through the strict parser here means a sender finds out about a NaN, a bad
    state or a float in an int field itself, instead of every receiver rejecting the message.
    """
    fields = [f for f in dataclasses.fields(msg) if f.name not in exclude]
    obj = {f.name: _plain(getattr(msg, f.name), f.name, ctx) for f in fields}
    parsed = loads_strict(dumps_canonical(obj, ctx), ctx)
    checked = fields_from_json(type(msg), parsed, ctx, exclude=exclude)
    # Re-plain the checked values so an int given for a float field is written as 4.0, not 4:
    # the bytes then depend only on the message's value, which keeps goldens stable.
    return {k: _plain(v, k, ctx) for k, v in checked.items()}


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
            ok = tensor.values.dtype == np.float32 and tensor.indices.dtype == np.int64
            dtype = f"{tensor.indices.dtype}/{tensor.values.dtype}"
        elif isinstance(tensor, np.ndarray):
            shape, ok, dtype = tuple(tensor.shape), tensor.dtype == np.float32, str(tensor.dtype)
        else:
            raise ProtocolError(f"{ctx}: tensor {name!r} is a {type(tensor).__name__}, not an array")
        if shape != want:
            raise ProtocolError(f"{ctx}: tensor {name!r} has shape {shape}, layout expects {want}")
        if not ok:
            raise ProtocolError(f"{ctx}: tensor {name!r} has dtype {dtype}, expected float32 (int64 indices)")
    if not allow_missing:
        missing = [n for n in expected if n not in tensors]
        if missing:
            count = f"{len(missing)} of {len(expected)} missing"
            raise ProtocolError(f"{ctx}: missing tensor {missing[0]!r} ({count})")
