"""Per-device network shaping: a network namespace, a veth pair and `tc tbf` on each side.

One `Network` per run (a campaign, a test) owns a private bridge and a /20 of 198.18.0.0/15
(RFC 2544 benchmarking space: routed nowhere; a slot that overlaps any route of the host is
skipped). The bridge holds the host side's address (`.1`): the broker listens there, and the
namespaces reach each other through the bridge (L2, no forwarding). Each endpoint gets:

    netns  orch-s<slot>-<name>      its process runs in it (joined before exec, like the cgroup)
    veth   orh<slot>x<i> (host, on the bridge)  <->  orn<slot>x<i> (in the namespace)
    tbf    on orn...  egress = the endpoint's uplink; on orh... egress = its downlink
    netem  (delay / loss) as the root with tbf below it, only where the kernel has netem

Rates change in place (`tc qdisc change`), so a bandwidth trace never drops a connection.

Cleanup. A slot is claimed by creating `<state_dir>/slot-<n>` (atomic mkdir) holding the owner's
pid and start time; everything of the slot is named after it. `close()` removes it all; an atexit
hook covers a normal exit, and `sweep_stale()` (run by every new Network) removes the slots of dead
owners: a crashed or SIGKILLed run, or one interrupted before close. Deleting a namespace deletes
its veth pair, and with it both qdiscs.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ConfigError, OrchardError
from testbed.orphans import proc_start, same_process

NET_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
SLOT_PREFIX = 20  # 32 slots of 4094 addresses each
STATE_DIR = "/run/orchard-netns"
NS_PREFIX = "orch-s"
CLONE_NEWNET = 0x40000000
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,40}")
_live: dict[int, Network] = {}
_live_lock = threading.Lock()


@dataclass(frozen=True)
class NetSupport:
    """What this host can shape with, probed in a throwaway namespace."""

    netns: bool
    tbf: bool
    netem: bool
    reason: str  # why netns/tbf is unusable, "" when usable

    def describe(self) -> str:
        if not (self.netns and self.tbf):
            return f"network shaping unavailable: {self.reason}"
        return ("network shaping: namespaces + veth + tbf available; netem (delay/loss) "
                + ("available" if self.netem else "NOT available in this kernel"))


@dataclass(frozen=True)
class Endpoint:
    """One shaped process's place: its namespace, address and both ends of its veth."""

    name: str
    netns: str
    address: str
    host_if: str
    ns_if: str

    def enter(self) -> None:
        """Move the calling process into the namespace (a Popen preexec_fn; only the net namespace,
        so /sys/fs/cgroup and the file system stay as they are)."""
        setns(self.netns)


def _run(args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        raise OrchardError(f"{args[0]} is not installed (network shaping needs iproute2: ip, tc)") from None
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise OrchardError(f"`{' '.join(args)}` failed: {msg[0] if msg else f'exit {proc.returncode}'}")
    return proc


def setns(netns: str) -> None:
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if hasattr(os, "setns"):  # 3.12+
            os.setns(fd, CLONE_NEWNET)
        elif ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({netns}) failed")
    finally:
        os.close(fd)


_support: NetSupport | None = None


def probe_support() -> NetSupport:
    """Root? netns, tbf and netem? Probed once per process in a namespace of its own."""
    global _support
    if _support is not None:
        return _support
    if os.geteuid() != 0:
        _support = NetSupport(False, False, False, f"network namespaces need root (this process runs as uid "
                                                   f"{os.geteuid()})")
        return _support
    if shutil.which("ip") is None or shutil.which("tc") is None:
        _support = NetSupport(False, False, False, "iproute2 (ip, tc) is not installed")
        return _support
    probe = f"orch-probe-{os.getpid()}"
    try:
        made = _run(["ip", "netns", "add", probe], check=False)
        if made.returncode != 0:
            _support = NetSupport(False, False, False, f"cannot create a network namespace: {made.stderr.strip()}")
            return _support
        _run(["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"], check=False)
        tbf = _run(["tc", "-n", probe, "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "1mbit", "burst", "4k",
                    "limit", "64k"], check=False)
        netem = _run(["tc", "-n", probe, "qdisc", "replace", "dev", "p0", "root", "netem", "delay", "1ms"],
                     check=False)
        _support = NetSupport(True, tbf.returncode == 0, netem.returncode == 0,
                              "" if tbf.returncode == 0 else f"tc tbf failed: {tbf.stderr.strip()}")
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return _support


def require_support(*, netem: bool = False) -> NetSupport:
    """OrchardError with one line when what a campaign asks for is missing."""
    s = probe_support()
    if not (s.netns and s.tbf):
        raise OrchardError(s.describe())
    if netem and not s.netem:
        raise ConfigError("link delay_ms / loss_pct need the kernel's netem qdisc, which this kernel lacks "
                          "(tc: \"Specified qdisc kind is unknown\"); remove delay_ms and loss_pct")
    return s


# ------------------------------------------------------------------------------ listing / sweep
def list_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.startswith(NS_PREFIX))


def list_links() -> list[str]:
    """Bridges and host-side veths of every slot (the namespace-side ends live in the namespaces)."""
    out = _run(["ip", "-o", "link", "show"], check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return sorted(n for n in names if re.fullmatch(r"or(br|h)\d+(x\d+)?", n))


def list_qdiscs() -> list[str]:
    """tbf/netem qdiscs on the host side and in every slot namespace."""
    found = [f"host: {q}" for q in _run(["tc", "qdisc", "show"], check=False).stdout.splitlines()
             if re.search(r"dev or(br|h)\d+", q) and ("tbf" in q or "netem" in q)]
    for ns in list_namespaces():
        found += [f"{ns}: {q}" for q in _run(["tc", "-n", ns, "qdisc", "show"], check=False).stdout.splitlines()
                  if "tbf" in q or "netem" in q]
    return found


def teardown_slot(slot: int) -> None:
    """Kill what runs in the slot's namespaces, delete them, its host-side veths and its bridge."""
    for ns in list_namespaces():
        if not ns.startswith(f"{NS_PREFIX}{slot}-"):
            continue
        for pid in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
            if int(pid) != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        _run(["ip", "netns", "del", ns], check=False)
    for link in list_links():
        if re.fullmatch(rf"orh{slot}x\d+|orbr{slot}", link):
            _run(["ip", "link", "del", link], check=False)


def sweep_stale() -> list[int]:
    """Remove every slot whose owner is gone, and slot resources nobody claims. Returns the slots.
    One state dir for every run on the host (never a private one: claims must be seen by all)."""
    state_dir = STATE_DIR
    claimed: dict[int, bool] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(state_dir):
            m = re.fullmatch(r"slot-(\d+)", entry)
            if m is None:
                continue
            try:
                record = json.loads((Path(state_dir) / entry / "owner.json").read_text())
            except (OSError, ValueError):
                record = {}
            claimed[int(m.group(1))] = isinstance(record, dict) and same_process(record.get("pid"), record.get("start"))
    present = {int(m.group(1)) for n in list_namespaces() if (m := re.match(rf"{NS_PREFIX}(\d+)-", n))}
    present |= {int(m.group(2)) for n in list_links() if (m := re.match(r"or(br|h)(\d+)", n))}
    # A slot dir is made before its first resource, and its owner file right after it: resources
    # of an unclaimed slot are leftovers; a dir without an owner file may be a claim in progress.
    dead = {s for s, alive in claimed.items() if not alive and (Path(state_dir) / f"slot-{s}" / "owner.json").exists()}
    # Resources listed after the claims: a run that claimed meanwhile has its dir by now.
    unclaimed = {s for s in present - set(claimed) if not (Path(state_dir) / f"slot-{s}").exists()}
    stale = sorted(unclaimed | dead)
    for slot in stale:
        teardown_slot(slot)
        shutil.rmtree(Path(state_dir) / f"slot-{slot}", ignore_errors=True)
    return stale


# ------------------------------------------------------------------------------ the network
class Network:
    """A run's bridge and its shaped endpoints. `with Network.open(dilation) as net: ep = net.add(...)`."""

    def __init__(self, slot: int, support: NetSupport) -> None:
        self.slot = slot
        self.state_dir = STATE_DIR
        self.support = support
        self.subnet: ipaddress.IPv4Network = list(NET_RANGE.subnets(new_prefix=SLOT_PREFIX))[slot]
        self.bridge = f"orbr{slot}"
        self.bridge_ip = str(self.subnet.network_address + 1)
        self.endpoints: dict[str, Endpoint] = {}
        self._netem: set[str] = set()
        self._closed = False

    @classmethod
    def open(cls, *, netem: bool = False) -> Network:
        support = require_support(netem=netem)
        sweep_stale()
        state_dir = STATE_DIR
        os.makedirs(state_dir, mode=0o755, exist_ok=True)
        taken = _routed_networks()
        for slot, subnet in enumerate(NET_RANGE.subnets(new_prefix=SLOT_PREFIX)):
            if any(subnet.overlaps(t) for t in taken):
                continue
            try:
                os.mkdir(Path(state_dir) / f"slot-{slot}")
            except FileExistsError:
                continue
            record = {"pid": os.getpid(), "start": proc_start(os.getpid()), "argv": sys.argv[:3]}
            (Path(state_dir) / f"slot-{slot}" / "owner.json").write_text(json.dumps(record) + "\n")
            net = cls(slot, support)
            with _live_lock:
                _live[slot] = net
            try:
                _run(["ip", "link", "add", net.bridge, "type", "bridge"])
                _run(["ip", "addr", "add", f"{net.bridge_ip}/{SLOT_PREFIX}", "dev", net.bridge])
                _run(["ip", "link", "set", net.bridge, "up"])
            except BaseException:
                net.close()
                raise
            return net
        raise OrchardError(f"no free /{SLOT_PREFIX} left in {NET_RANGE} for a testbed bridge "
                           f"(claims in {state_dir}; `orchard` runs sweep dead ones at start)")

    def add(self, name: str, up_bit: int, down_bit: int, *, up_args: list[str], down_args: list[str],
            netem_args: list[str] | None = None) -> Endpoint:
        """A namespace for `name`, wired to the bridge, with tbf `up_args` / `down_args` (testbed.links)."""
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigError(f"endpoint name {name!r}: 1-41 letters, digits, '_' or '-'")
        if name in self.endpoints:
            raise ConfigError(f"endpoint {name!r} already exists in this network")
        if netem_args and not self.support.netem:
            raise ConfigError("link delay_ms / loss_pct need netem, which this kernel lacks")
        index = len(self.endpoints)
        if index + 2 >= self.subnet.num_addresses - 1:
            raise ConfigError(f"more than {self.subnet.num_addresses - 3} shaped endpoints in one run")
        ep = Endpoint(name, f"{NS_PREFIX}{self.slot}-{name}", str(self.subnet.network_address + 2 + index),
                      f"orh{self.slot}x{index}", f"orn{self.slot}x{index}")
        self.endpoints[name] = ep
        _run(["ip", "netns", "add", ep.netns])
        _run(["ip", "link", "add", ep.host_if, "type", "veth", "peer", "name", ep.ns_if, "netns", ep.netns])
        _run(["ip", "link", "set", ep.host_if, "master", self.bridge, "up"])
        _run(["ip", "-n", ep.netns, "addr", "add", f"{ep.address}/{SLOT_PREFIX}", "dev", ep.ns_if])
        _run(["ip", "-n", ep.netns, "link", "set", ep.ns_if, "up"])
        _run(["ip", "-n", ep.netns, "link", "set", "lo", "up"])
        if netem_args:
            self._netem.add(name)
            _run(["tc", "-n", ep.netns, "qdisc", "add", "dev", ep.ns_if, "root", "handle", "1:", "netem", *netem_args])
            _run(["tc", "qdisc", "add", "dev", ep.host_if, "root", "handle", "1:", "netem", *netem_args])
        self._tbf("add", ep, up_args, down_args)
        return ep

    def _tbf(self, verb: str, ep: Endpoint, up_args: list[str], down_args: list[str]) -> None:
        where = ["parent", "1:", "handle", "2:"] if ep.name in self._netem else ["root", "handle", "2:"]
        _run(["tc", "-n", ep.netns, "qdisc", verb, "dev", ep.ns_if, *where, "tbf", *up_args])
        _run(["tc", "qdisc", verb, "dev", ep.host_if, *where, "tbf", *down_args])

    def change(self, name: str, up_args: list[str], down_args: list[str]) -> None:
        """New rates in place (`tc qdisc change`): connections survive a trace step."""
        self._tbf("change", self.endpoints[name], up_args, down_args)

    def counters(self, name: str) -> tuple[int, int]:
        """(uplink bytes, downlink bytes) through the endpoint's veth so far: the host side's
        rx is what the device sent, its tx what it received."""
        ep = self.endpoints[name]
        stats = Path("/sys/class/net") / ep.host_if / "statistics"
        try:
            return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())
        except (OSError, ValueError):
            return 0, 0

    def close(self) -> None:
        """Remove every namespace, veth, qdisc and the bridge of this run; idempotent."""
        if self._closed:
            return
        self._closed = True
        teardown_slot(self.slot)
        shutil.rmtree(Path(self.state_dir) / f"slot-{self.slot}", ignore_errors=True)
        with _live_lock:
            _live.pop(self.slot, None)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _routed_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 prefix the host routes (all tables), so a slot never shadows a real network."""
    out = _run(["ip", "-4", "-o", "route", "show", "table", "all"], check=False).stdout
    nets = []
    for line in out.splitlines():
        dst = line.split()[0] if line.split()[0] not in ("local", "broadcast", "unicast") else line.split()[1]
        if dst == "default":
            continue
        with contextlib.suppress(ValueError):
            net = ipaddress.ip_network(dst, strict=False)
            if isinstance(net, ipaddress.IPv4Network) and not re.search(r"dev orbr\d+", line):
                nets.append(net)
    return nets


def is_testbed_address(host: str) -> bool:
    """An address of a testbed bridge on this host: where an anonymous broker may listen, since
    only the testbed's namespaces can reach it (the range is routed nowhere, forwarding is off)."""
    try:
        if ipaddress.ip_address(host) not in NET_RANGE:
            return False
    except ValueError:
        return False
    out = _run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    return any(re.search(rf"\bor(br)\d+\s+inet {re.escape(host)}/", line) for line in out.splitlines())


@atexit.register
def _close_live_at_exit() -> None:
    for net in list(_live.values()):
        try:
            net.close()
        except OrchardError as exc:
            print(f"orchard: could not remove network slot {net.slot} at exit: {exc}", file=sys.stderr)
