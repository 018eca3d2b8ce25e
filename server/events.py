"""What goes into the round engine (events) and what comes out (actions).

The MQTT adapter turns broker messages into events and actions into publishes; the in-memory
transport (`server/memory.py`) does the same on a virtual clock. All are frozen dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from runtime.protocol import Assignment, Hello, Status, Update
from server.aggregate import FloatArray, IndexArray


class EventName(StrEnum):
    """Every `event` value in events.jsonl: the engine's, the service's and the campaign
    runner's. The report and the live view read them by these names only."""

    # the round engine
    DEVICE_HELLO = "device_hello"
    DEVICE_OFFLINE = "device_offline"
    STATUS_REJECTED = "status_rejected"
    TASK_SENT = "task_sent"
    TASK_ABANDONED = "task_abandoned"
    UPDATE_ACCEPTED = "update_accepted"
    UPDATE_REJECTED = "update_rejected"
    PROFILE_DOWNGRADED = "profile_downgraded"
    DOWNGRADE_REFUSED = "downgrade_refused"  # the OOM fallback's choice cannot be sent under this strategy
    AGGREGATED = "aggregated"
    AGGREGATION_FAILED = "aggregation_failed"
    FINISHED = "finished"
    # the MQTT service
    SERVER_START = "server_start"
    SERVER_STOP = "server_stop"
    BROKER_RECONNECTED = "broker_reconnected"
    BROKER_DISCONNECTED = "broker_disconnected"
    DEVICE_STATUS = "device_status"
    EVALUATE = "evaluate"
    ARTIFACT_SENT = "artifact_sent"
    ARTIFACT_HELD = "artifact_held"  # not sent: the device is over its artifact-send rate limit
    TASK_FRAME = "task_frame"
    UPDATE_RECEIVED = "update_received"
    EVALUATE_PROFILE = "evaluate_profile"
    FRAME_REJECTED = "frame_rejected"
    HELLO_REJECTED = "hello_rejected"
    TELEMETRY_REJECTED = "telemetry_rejected"
    RECEIPT_SENT = "receipt_sent"  # the verdict on one update, told to its device
    UPDATE_REPEATED = "update_repeated"  # a re-sent copy of an update already answered: receipt again
    # the campaign runner
    CAMPAIGN_START = "campaign_start"
    CAMPAIGN_STOPPING = "campaign_stopping"  # processes are being stopped: tasks still out are unfinished
    CAMPAIGN_STOP = "campaign_stop"
    AVAILABILITY = "availability"
    CPU_QUOTA = "cpu_quota"
    LINK_RATE = "link_rate"  # a link trace step: the device's caps now, in board Mbit/s (testbed.links)
    OOM = "oom"
    DEVICE_EXIT = "device_exit"
    DEVICE_RESTART = "device_restart"
    NODE_LOST = "node_lost"  # a cluster node's launcher died: its devices are gone with it (testbed.cluster)

    @property
    def is_rejection(self) -> bool:
        return self.value.endswith("_rejected")


# ---------------------------------------------------------------- events in
@dataclass(frozen=True)
class DeviceHello:
    device_id: str
    hello: Hello


@dataclass(frozen=True)
class DeviceStatus:
    device_id: str
    status: Status


@dataclass(frozen=True)
class DeviceOffline:
    device_id: str
    reason: str = "offline"  # e.g. "last will", "availability trace"


@dataclass(frozen=True, eq=False)
class UpdateReceived:
    """A decoded update. `values` is the flat float32 buffer the device sent (`update.kind`
    says weights or delta). `indices` are its coordinates in the GLOBAL buffer; None means
    "the coordinates of the task's profile" (the usual case); a subset of those is allowed for
    sparse uploads (ZeroFL top-k)."""

    device_id: str
    update: Update
    values: FloatArray
    indices: IndexArray | None = None


@dataclass(frozen=True)
class Tick:
    """Time passed. `now=None`: read the engine's clock. Drivers tick at `engine.next_deadline()`
    or periodically; deadlines and time limits are only checked on events."""

    now: float | None = None


Event = DeviceHello | DeviceStatus | DeviceOffline | UpdateReceived | Tick


# ---------------------------------------------------------------- actions out
@dataclass(frozen=True, eq=False)
class SendTask:
    """Send `device_id` the current global model restricted to `indices` (None = all of it).

    The adapter fills the training knobs (steps, lr, batch) from the campaign and slices
    `engine.global_flat[indices]` for the frame; the slice must be taken before the engine
    handles the next event, since that may publish a new version.
    """

    device_id: str
    task_id: str
    round: int
    base_version: int
    assignment: Assignment
    indices: IndexArray | None
    deadline_s: float | None  # seconds the device has before its work is useless; None = no limit


@dataclass(frozen=True)
class NewGlobal:
    """A new global model (`engine.global_flat`) was published as `version`."""

    version: int
    round: int
    t: float
    n_updates: int
    device_ids: tuple[str, ...]
    staleness: tuple[int, ...]  # per merged update, same order as device_ids
    reason: str  # why the round closed


@dataclass(frozen=True)
class Evaluate:
    version: int


@dataclass(frozen=True)
class Log:
    """One line for events.jsonl; `event["event"]` names it, rejections carry `reason`."""

    event: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Finish:
    reason: str
    version: int


Action = SendTask | NewGlobal | Evaluate | Log | Finish
