"""The links of a run: which processes are shaped, their namespaces, their trace, their bytes.

The campaign runner (and `orchard compute-node` launchers) give `RunLinks` a LinkSpec per process
name; it opens one `testbed.netns.Network` when at least one process is shaped, wires each into
it with tbf figures for the run's dilation (testbed.links), steps the bandwidth traces with
`tc qdisc change`, and reads each veth's byte counters for the report. Unshaped processes stay in
the host's namespace and reach the broker on loopback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError, OrchardError
from testbed.links import LinkSpec, link_trace, netem_args, tbf_figures
from testbed.netns import Endpoint, NetSupport, Network, require_support
from testbed.traces import CpuTrace, TraceDriver

LOOPBACK = "127.0.0.1"


def check_links(links: Mapping[str, LinkSpec], broker_spec: str) -> NetSupport | None:
    """Before anything starts: can this host shape what the campaign asks for? One-line errors."""
    if not links:
        return None
    if "://" in broker_spec:
        raise ConfigError(f"shaped links need a broker the testbed runs (embedded or mosquitto) on its bridge; "
                          f"the external broker {broker_spec} is unreachable from the device namespaces")
    try:
        return require_support(netem=any(s.needs_netem for s in links.values()))
    except OrchardError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"[[fleet]] link caps need network namespaces: {exc}") from None


class RunLinks:
    """Every shaped process of one run. Use `open()`, then `add()` each, `close()` at the end."""

    def __init__(self, links: Mapping[str, LinkSpec], dilation: float) -> None:
        self.specs = dict(links)
        self.dilation = dilation
        self.network: Network | None = None
        self.endpoints: dict[str, Endpoint] = {}
        self.fraction: dict[str, float] = {}
        self._bytes: dict[str, tuple[int, int]] = {}

    @property
    def broker_host(self) -> str:
        """Where the broker must listen: the bridge, which host processes reach as well."""
        return self.network.bridge_ip if self.network is not None else LOOPBACK

    def open(self) -> RunLinks:
        if self.specs and self.network is None:
            self.network = Network.open(netem=any(s.needs_netem for s in self.specs.values()))
            for name, spec in self.specs.items():
                up, down = tbf_figures(spec.up_mbit, self.dilation), tbf_figures(spec.down_mbit, self.dilation)
                self.endpoints[name] = self.network.add(name, up.rate_bit, down.rate_bit, up_args=up.args(),
                                                        down_args=down.args(),
                                                        netem_args=netem_args(spec, self.dilation) or None)
                self.fraction[name] = 1.0
        return self

    def endpoint(self, name: str) -> Endpoint | None:
        return self.endpoints.get(name)

    def set_fraction(self, name: str, fraction: float) -> tuple[float, float]:
        """Scale a process's caps to `fraction` of its spec (a trace step); returns the board caps."""
        spec = self.specs[name]
        if not (math.isfinite(fraction) and 0 < fraction <= 1):
            raise ConfigError(f"link trace value {fraction!r} for {name!r} must be in (0, 1]")
        up_mbit, down_mbit = spec.up_mbit * fraction, spec.down_mbit * fraction
        if self.network is not None and self.fraction.get(name) != fraction:
            self.network.change(name, tbf_figures(up_mbit, self.dilation).args(),
                                tbf_figures(down_mbit, self.dilation).args())
        self.fraction[name] = fraction
        return up_mbit, down_mbit

    def trace_driver(self, base_dir: Path, seed: int, index_of: Mapping[str, int],
                     on_change: Callable[[str, float], None]) -> TraceDriver:
        """A TraceDriver over the link traces (the CPU kinds, on their own random stream)."""
        traces: dict[str, CpuTrace] = {
            name: link_trace(spec, seed=seed + 2000 + index_of[name], base_dir=base_dir, device=name,
                             index=index_of[name])
            for name, spec in self.specs.items()}
        return TraceDriver({}, traces, set_online=lambda _d, _o: None, set_cpu_fraction=on_change)

    def slow_link_warnings(self, frame_bytes: int, timeout_wall_s: float) -> list[str]:
        """Links too slow to carry one model frame within the wall-time reassembly timeout (the
        agent's and the server's), even at their trace's lowest fraction seen so far (1.0 at start)."""
        out = []
        for name, spec in self.specs.items():
            slowest_bit = min(spec.up_mbit, spec.down_mbit) * 1e6 / self.dilation
            wall_s = 8 * frame_bytes / slowest_bit
            if wall_s > 0.8 * timeout_wall_s:
                out.append(f"{name}: a {frame_bytes / 1e6:.2f} MB frame takes {wall_s:.0f} wall s at "
                           f"{min(spec.up_mbit, spec.down_mbit):g} Mbit/s / dilation {self.dilation:g}, against a "
                           f"{timeout_wall_s:g} s reassembly timeout: its transfers may be dropped")
        return out

    def record_bytes(self) -> None:
        """Read every veth's counters (before close removes them)."""
        if self.network is not None:
            for name in self.endpoints:
                self._bytes[name] = self.network.counters(name)

    def write_bytes(self, fleet_json: Path) -> None:
        """Each shaped process's bytes through its veth, into fleet.json's `link` for the report."""
        if not self.endpoints or not fleet_json.is_file():
            return
        self.record_bytes()
        fleet = json.loads(fleet_json.read_text())
        for entry in fleet.get("devices", []):
            entry["link"] = self.describe(str(entry.get("id")))
        fleet_json.write_text(json.dumps(fleet, indent=1) + "\n")

    def describe(self, name: str) -> dict[str, Any] | None:
        """fleet.json's `link` of one process: caps in board units, what tc was given, bytes moved."""
        spec, ep = self.specs.get(name), self.endpoints.get(name)
        if spec is None or ep is None:
            return None
        up, down = tbf_figures(spec.up_mbit, self.dilation), tbf_figures(spec.down_mbit, self.dilation)
        moved = self._bytes.get(name)
        return {**spec.as_dict(), "tc_up_bit": up.rate_bit, "tc_down_bit": down.rate_bit, "netns": ep.netns,
                "address": ep.address, "bytes_up": moved[0] if moved else None,
                "bytes_down": moved[1] if moved else None}

    def close(self) -> None:
        if self.network is not None:
            self.record_bytes()
            self.network.close()
