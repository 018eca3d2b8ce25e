"""A lab: a campaign's fleet as real boards, laid out in one folder that the other commands read.

`orchard lab init LAB --campaign FILE` writes what the server and every board start from, the
same layout a testbed run has (testbed/prepare.py): `configs/server.toml`, `artifacts.json` and
`init.npy`, the held-out split `eval.npz`, one shard per device in `shards/`, and `lab.toml`,
the lab's own index:

    [lab]      name, campaign (the file it came from), root (MQTT topic root, the server's)
    [broker]   kind (mosquitto | embedded), listen, port: what `orchard broker` starts;
               url: the broker as the boards reach it (mqtt://<this host's LAN address>:port)
    [[device]] id, board, profiles, shard, host (the SSH target `orchard flash` uses; fill it in)

`orchard broker --lab LAB` starts that broker with the lab's logins and ACLs (`LAB/secrets/`,
which `lab init` provisions as every testbed run does: testbed/lab_secrets.py), so it may listen
where the boards reach it. `--insecure-anonymous` serves anonymously instead (loopback, or a
closed lab network). `orchard bundle --lab LAB --device ID` and
`orchard flash --lab LAB --device ID` take the device's entry.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError
from runtime.mqtt import parse_broker_url
from runtime.tomlconf import TomlTable, load_toml
from testbed.broker import LOOPBACK, AmqttBroker, Broker, MosquittoBroker
from testbed.campaign import load_campaign
from testbed.lab_secrets import Lab as SecretsLab
from testbed.lab_secrets import load_lab as load_secrets
from testbed.orphans import RunLedger, sweep_and_report
from testbed.prepare import DataPlan, DevicePlan, fresh_run_dir, prepare_run, write_toml
from testbed.runner import server_tables

LAB_FILE = "lab.toml"
BROKER_KINDS = ("mosquitto", "embedded")


@dataclass(frozen=True)
class LabDevice:
    device_id: str
    board: str
    profiles: tuple[str, ...]
    shard: Path
    host: str  # "" until filled in


@dataclass(frozen=True)
class Lab:
    folder: Path
    name: str
    campaign: Path
    root: str
    broker_kind: str
    listen: str
    port: int
    broker_url: str  # as the boards see it
    devices: tuple[LabDevice, ...]

    def device(self, device_id: str) -> LabDevice:
        for d in self.devices:
            if d.device_id == device_id:
                return d
        known = ", ".join(d.device_id for d in self.devices)
        raise ConfigError(f"lab {self.folder}: no device {device_id!r} (its devices: {known})")


def _lan_address() -> str:
    """This host's address on its default route (no packet is sent), for the boards' broker URL."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
            return str(s.getsockname()[0])
        except OSError:
            return LOOPBACK


def init_lab(folder: Path, campaign_file: Path, *, broker_host: str | None = None, port: int = 1883,
             broker_kind: str = "mosquitto", force: bool = False) -> Lab:
    """Lay out `folder` for the campaign's fleet on real boards; returns the lab."""
    campaign = load_campaign(campaign_file)
    if broker_kind not in BROKER_KINDS:
        raise ConfigError(f"--broker-kind {broker_kind!r}: expected one of {', '.join(BROKER_KINDS)}")
    host = broker_host or _lan_address()
    url = f"mqtt://{host}:{port}"
    parse_broker_url(url)
    plans = [DevicePlan(d, g.board, g.profiles, g.name) for d, g in campaign.devices()]
    fresh_run_dir(folder, force)
    try:
        data = DataPlan(campaign.model, campaign.dataset, campaign.data_root, campaign.partition,
                        campaign.eval_fraction, campaign.seed, campaign.samples, campaign.input_shape)
        # Every board says hello before the first task, unless the campaign says how many to wait for.
        min_devices = campaign.min_devices if campaign.min_devices is not None else len(plans)
        prepare_run(folder, data, plans, server_tables(campaign, min_devices), keepalive_s=campaign.keepalive_s,
                    offline=campaign.offline)
        for sub in ("devices", "cache"):  # the testbed's per-run folders; a lab's boards keep their own
            (folder / sub).rmdir()
        write_toml(folder / LAB_FILE, {
            "lab": {"name": folder.name, "campaign": str(Path(campaign_file).resolve()),
                    "root": f"orchard/{folder.name}"},
            "broker": {"kind": broker_kind, "listen": LOOPBACK, "port": port, "url": url},
        })
        with (folder / LAB_FILE).open("a") as f:
            for p in plans:
                f.write(f'[[device]]\nid = "{p.device_id}"\nboard = "{p.board}"\n'
                        f'profiles = {json.dumps(list(p.profiles))}\nshard = "shards/{p.device_id}.npz"\n'
                        f'host = ""  # SSH target, e.g. pi@{p.device_id}.local\n\n')
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # nothing half-written
        raise
    return load_lab(folder)


def load_lab(folder: Path) -> Lab:
    path = Path(folder) / LAB_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} is not a lab (no {LAB_FILE}); make one with `orchard lab init`")
    data = load_toml(path)
    file = str(path)
    for key in data:
        if key not in ("lab", "broker", "device"):
            raise ConfigError(f"{file}: unknown table '{key}' (expected [lab], [broker], [[device]])")
    lab_t = TomlTable(file, "lab", data.get("lab", {}), frozenset({"name", "campaign", "root"}))
    broker_t = TomlTable(file, "broker", data.get("broker", {}), frozenset({"kind", "listen", "port", "url"}))
    url = broker_t.string("url")
    parse_broker_url(url)
    listen = broker_t.string("listen")
    try:
        ipaddress.ip_address(listen)
    except ValueError:
        raise broker_t.fail(f"[broker] listen must be an IP address, got {listen!r}") from None
    devices = []
    entries = data.get("device", [])
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{file}: no [[device]] entries")
    for entry in entries:
        t = TomlTable(file, "device", entry, frozenset({"id", "board", "profiles", "shard", "host"}))
        devices.append(LabDevice(t.string("id"), t.string("board"), t.strings("profiles"),
                                 Path(folder) / t.string("shard"), str(entry.get("host", "")).strip()))
    return Lab(Path(folder), lab_t.string("name"), Path(lab_t.string("campaign")), lab_t.string("root"),
               broker_t.string("kind", BROKER_KINDS), listen, broker_t.integer("port", 1, 65535), url,
               tuple(devices))


class _LanMosquitto(MosquittoBroker):
    """mosquitto on the lab's address (the base starts on loopback: it refuses anything else)."""

    def __init__(self, port: int, listen: str, secrets: SecretsLab | None) -> None:
        super().__init__(port, lab=secrets)
        self.host, self.url = listen, f"{'mqtts' if self.tls else 'mqtt'}://{listen}:{port}"

    def config_text(self) -> str:
        return super().config_text().replace(f"listener {self.port} {LOOPBACK}", f"listener {self.port} {self.host}")


class _LanAmqtt(AmqttBroker):
    def __init__(self, port: int, listen: str, secrets: SecretsLab | None) -> None:
        super().__init__(port, lab=secrets)
        self.host, self.url = listen, f"mqtt://{listen}:{port}"


def lab_broker(lab: Lab, *, kind: str | None = None, listen: str | None = None, port: int | None = None,
               insecure_anonymous: bool = False) -> Broker:
    """The unstarted broker `orchard broker` runs for the lab: the lab's logins and ACLs, or
    anonymous when asked (which a reachable address needs said out loud)."""
    kind = kind or lab.broker_kind
    listen = listen or lab.listen
    port = port or lab.port
    secrets = None
    if not insecure_anonymous:
        if not (lab.folder / "secrets" / "lab.json").is_file():
            raise ConfigError(f"lab {lab.folder} has no secrets/ (logins, keys, run id): make it with `orchard lab "
                              "init`, or pass --insecure-anonymous (a closed lab network only)")
        secrets = load_secrets(lab.folder)
    return _LanMosquitto(port, listen, secrets) if kind == "mosquitto" else _LanAmqtt(port, listen, secrets)


def serve(broker: Broker, say: Callable[[str], None], stop: threading.Event | None = None,
          lab_folder: Path | None = None) -> int:
    """Start the broker and keep it up until SIGINT/SIGTERM (or `stop`); 0 on a clean stop. Its
    process group is in a ledger (testbed.orphans) until it stopped, so if this process is
    SIGKILLed the next `orchard broker` (or any run) stops the broker it left."""
    stop = stop or threading.Event()
    sweep_and_report()  # a SIGKILLed `orchard broker` left its broker holding the port: stop it first
    ledger = RunLedger()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with broker:
            ledger.open(lab_folder or Path.cwd()).add_process("broker", broker.pid, broker.scratch_dir)
            say(f"broker {broker.url} ({broker.kind}, pid group of its own); Ctrl-C stops it")
            while not stop.wait(0.5):
                if not broker.running:
                    raise ConfigError(f"the {broker.kind} broker on {broker.url} exited")
    finally:
        ledger.close()  # the with block has stopped the broker
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say("broker stopped")
    return 0


def bundle_args(lab: Lab, device_id: str) -> dict[str, Any]:
    """What `orchard bundle` takes from the lab for one device. No prebuilt artifacts: the server
    pushes each board what it lacks at its first task (a bundle's copy only saves that download)."""
    d = lab.device(device_id)
    return {"board": d.board, "device_id": d.device_id, "broker_url": lab.broker_url, "root": lab.root,
            "profiles": list(d.profiles), "shard": d.shard}


def flash_target(lab: Lab, device_id: str, host: str | None) -> tuple[Path, str]:
    d = lab.device(device_id)
    tar = lab.folder / "dist" / f"orchard-{d.board}-{d.device_id}.tar.gz"
    if not tar.is_file():
        raise ConfigError(f"no bundle {tar}: run `orchard bundle --lab {lab.folder} --device {device_id}` first")
    target = host or d.host
    if not target:
        raise ConfigError(f"device {device_id} has no host in {lab.folder / LAB_FILE}; fill in `host = "
                          f"\"pi@...\"` there or pass --host")
    return tar, target

