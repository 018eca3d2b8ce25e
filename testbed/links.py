"""Link specs of emulated devices: what a campaign asks for, in board units, and the tc figures
that deliver it under time dilation.

A campaign gives a [[fleet]] group (or any testbed process, e.g. a compute node) a link table:

    link = { kind = "wifi" }                            # the board's Wi-Fi figures (firmware_configs)
    link = { kind = "ethernet", down_mbit = 50 }        # the board's Ethernet, downlink overridden
    link = { kind = "custom", up_mbit = 2, down_mbit = 8, trace = { kind = "random_walk", ... } }
    link = { kind = "custom", up_mbit = 2, down_mbit = 8, delay_ms = 40, loss_pct = 0.5 }  # needs netem

`up_mbit` is the device's egress (device -> broker / other nodes), `down_mbit` its ingress; both
in Mbit/s (10^6 bit/s) of board time, as TCP goodput: what iperf3 reports and what the board
figures (firmware_configs [link.*]) are. tbf meters whole Ethernet frames, so its rate is the cap x
1514 / 1448 (a full-MSS segment with timestamps carries 1448 payload bytes in a 1514-byte frame on
the veths' 1500 MTU); without that, a 8 Mbit/s cap measured 7.67 (-4.1 %) on this host.
`trace` takes the CPU trace kinds (testbed.traces: constant, random_walk, file) and scales both
caps by its value in (0, 1] at each change.

Time dilation (testbed.dilation): the campaign runs `delta` times slower than the boards would, and
every reported time is wall / delta. A transfer of S bytes over a board link of B bit/s takes
8 S / B board seconds, i.e. 8 S delta / B wall seconds, so the kernel must be given the rate
B / delta. A delay of D board seconds is D x delta of wall time. Byte-sized figures are the same in
both time bases (a queue that holds Q bytes holds Q bytes at either speed), so the tbf queue limit
is sized in board terms and handed over unchanged; only its burst has a kernel constraint in wall
terms (it must cover one timer tick of the wall rate, tc-tbf(8)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.board import BoardConfig
from runtime.errors import ConfigError
from runtime.tomlconf import TomlTable
from testbed.traces import CpuTrace, make_cpu_trace

LINK_KINDS = ("wifi", "ethernet", "custom")  # wifi / ethernet: the board's figures; custom: give both caps
LINK_KEYS = frozenset({"kind", "up_mbit", "down_mbit", "delay_ms", "loss_pct", "trace"})
MAX_MBIT = 100_000.0
MTU_FRAME_BYTES = 1514
TCP_PAYLOAD_BYTES = 1448  # MSS with TCP timestamps at MTU 1500: goodput per frame
TICK_S = 0.01  # HZ=100, the coarsest kernel timer tbf may run on: the burst covers one tick of the rate
QUEUE_BOARD_S = 0.1  # queue of a shaped link: 100 ms of its board rate (a typical home router buffer)
MIN_QUEUE_BYTES = 64 * 1024  # one GSO super-packet, so a segmentable packet is never dropped outright


@dataclass(frozen=True)
class LinkSpec:
    """One device's link in board units; `trace` (a CPU-kind table) scales both caps over time."""

    kind: str
    up_mbit: float
    down_mbit: float
    delay_ms: float = 0.0
    loss_pct: float = 0.0
    trace: Mapping[str, Any] | None = None

    @property
    def needs_netem(self) -> bool:
        return self.delay_ms > 0 or self.loss_pct > 0

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "up_mbit": self.up_mbit, "down_mbit": self.down_mbit,
                "delay_ms": self.delay_ms, "loss_pct": self.loss_pct, "trace": dict(self.trace or {}) or None}


@dataclass(frozen=True)
class TbfFigures:
    """What `tc qdisc ... tbf` is given for one direction, in wall terms."""

    rate_bit: int  # bit/s of wall time
    burst_bytes: int
    limit_bytes: int

    def args(self) -> list[str]:
        return ["rate", f"{self.rate_bit}bit", "burst", str(self.burst_bytes), "limit", str(self.limit_bytes)]


def parse_link(where: str, raw: Any, board: BoardConfig | None) -> LinkSpec:
    """A campaign's link table -> LinkSpec, board defaults filled in. ConfigError names the field.
    `board` None (a process that is no board, e.g. a compute node on the host): custom only."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: link must be an inline table like {{ kind = \"wifi\" }}, got {raw!r}")
    t = TomlTable(where, "link", raw, LINK_KEYS)
    kind = raw.get("kind", "custom")
    if kind not in LINK_KINDS:
        raise ConfigError(f"{where}: link kind {kind!r} is unknown; expected one of {', '.join(LINK_KINDS)}")
    defaults = {k: (up, down) for k, up, down in board.links} if board is not None else {}
    if kind != "custom" and kind not in defaults:
        have = ", ".join(sorted(defaults)) or "none"
        what = f"board {board.name!r}" if board is not None else "a process that is no board"
        raise ConfigError(f"{where}: link kind {kind!r}: {what} has no {kind} figures "
                          f"(it has: {have}); give up_mbit and down_mbit with kind = \"custom\"")
    caps = []
    for i, key in enumerate(("up_mbit", "down_mbit")):
        if key in raw:
            caps.append(_cap(where, key, raw[key]))
        elif kind == "custom":
            raise ConfigError(f"{where}: link kind \"custom\" needs {key}")
        else:
            caps.append(defaults[kind][i])
    trace = raw.get("trace")
    if trace is not None and not isinstance(trace, dict):
        raise ConfigError(f"{where}: link trace must be an inline table like {{ kind = \"constant\", value = 0.5 }}")
    return LinkSpec(kind=kind, up_mbit=caps[0], down_mbit=caps[1],
                    delay_ms=t.number("delay_ms", 0.0, 60_000.0, default=0.0),
                    loss_pct=t.number("loss_pct", 0.0, 100.0, default=0.0), trace=trace)


def _cap(where: str, key: str, value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < value <= MAX_MBIT:
        raise ConfigError(f"{where}: link {key} = {value!r} must be a bandwidth in (0, {MAX_MBIT:g}] Mbit/s")
    return float(value)


def link_trace(spec: LinkSpec, *, seed: int, base_dir: str | Path, device: str, index: int) -> CpuTrace:
    """The fraction-of-cap trace of a link (constant 1.0 without one)."""
    table = spec.trace or {"kind": "constant", "value": 1.0}
    return make_cpu_trace(table, seed=seed, base_dir=base_dir, device=device, index=index, table="link.trace",
                          stream="link")


def tbf_figures(board_mbit: float, dilation: float) -> TbfFigures:
    """tbf figures that give `board_mbit` of board time under `dilation` (module doc)."""
    if not (math.isfinite(board_mbit) and board_mbit > 0):
        raise ConfigError(f"link cap {board_mbit!r} Mbit/s must be positive")
    if not (math.isfinite(dilation) and dilation >= 1):
        raise ConfigError(f"dilation {dilation!r} must be >= 1")
    wire_bit = board_mbit * 1e6 * MTU_FRAME_BYTES / TCP_PAYLOAD_BYTES
    rate_bit = max(8_000, round(wire_bit / dilation))  # tc's floor is ~1 kbit; 8 kbit is already absurd
    burst = max(2 * MTU_FRAME_BYTES, math.ceil(rate_bit / 8 * TICK_S))
    limit = max(MIN_QUEUE_BYTES, burst, math.ceil(wire_bit / 8 * QUEUE_BOARD_S))
    return TbfFigures(rate_bit, burst, limit)


def netem_args(spec: LinkSpec, dilation: float) -> list[str]:
    """netem delay/loss in wall terms: a delay of D board ms is D x dilation wall ms."""
    args: list[str] = []
    if spec.delay_ms > 0:
        args += ["delay", f"{spec.delay_ms * dilation:.3f}ms"]
    if spec.loss_pct > 0:
        args += ["loss", f"{spec.loss_pct:g}%"]
    return args
