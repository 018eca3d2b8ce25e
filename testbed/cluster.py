"""A campaign across the nodes of a Ray cluster (`[cluster] engine = "ray"`).

The head (where `orchard campaign run` runs) connects to the cluster, splits the fleet over the
nodes that offer CPUs (in proportion to them, groups kept in fleet order) and places one
testbed.node.NodeLauncher actor on each. Every node calibrates its own host and plans the
dilation it would need; the campaign runs at the largest, so board-speed ratios hold across
hosts. The head lays out the run folder, starts the broker (bound to its cluster address, or the
campaign's URL) and the server, ships each node its devices' configs, shards and trace files,
and writes what comes back (events, logs) into the one run folder; devices' telemetry traces
reach the server over MQTT as on one host. A node whose actor dies is lost: a `node_lost` event
names it, its devices die with it (their Last Will marks them offline) and the campaign goes on.
Ray is imported only here, and only when a campaign has [cluster].
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from runtime.device_config import DEFAULT_POLL_S, DEFAULT_TRAINER_START_TIMEOUT_S
from runtime.errors import ConfigError, OrchardError
from server.events import EventName
from testbed.campaign import Campaign
from testbed.dilation import Dilation
from testbed.live import LiveView
from testbed.node import NodeLauncher, dilation_at
from testbed.orphans import sweep_and_report
from testbed.prepare import DataPlan, DevicePlan, fresh_run_dir, prepare_run
from testbed.runner import LOOP_S, STOP_GRACE_S, CampaignRunner, _best_accuracy
from testbed.supervisor import stop_process_groups

CALIBRATE_TIMEOUT_S = 300.0  # a node that has no cached calibration measures its host first
DRAIN_TIMEOUT_S = 20.0  # a node silent this long (wall) while its actor lives is waited for, not lost


def place_devices(device_ids: list[str], node_cpus: dict[str, float]) -> dict[str, list[str]]:
    """Devices over nodes in proportion to the CPUs each offers (largest remainder, ties by
    node order), each node's share contiguous in fleet order. Nodes offering no CPU get none."""
    nodes = [n for n, cpus in node_cpus.items() if cpus > 0]
    if not nodes:
        raise ConfigError("[cluster]: no node of the Ray cluster offers a CPU to place devices on")
    total = sum(node_cpus[n] for n in nodes)
    exact = {n: len(device_ids) * node_cpus[n] / total for n in nodes}
    counts = {n: math.floor(exact[n]) for n in nodes}
    by_remainder = sorted(nodes, key=lambda n: (-(exact[n] - counts[n]), nodes.index(n)))
    for n in by_remainder[: len(device_ids) - sum(counts.values())]:
        counts[n] += 1
    out, start = {}, 0
    for n in nodes:
        if counts[n]:
            out[n] = device_ids[start:start + counts[n]]
            start += counts[n]
    return out


def _files_for(run: Path, campaign: Campaign, device_ids: list[str]) -> dict[str, bytes]:
    """What a node's devices read from disk: their configs and shards, and the trace files the
    fleet names (by their path relative to the campaign file, as the node's copy resolves them)."""
    files = {}
    for d in device_ids:
        files[f"configs/{d}.toml"] = (run / "configs" / f"{d}.toml").read_bytes()
        files[f"shards/{d}.npz"] = (run / "shards" / f"{d}.npz").read_bytes()
        files[f"secrets/{d}.toml"] = (run / "secrets" / f"{d}.toml").read_bytes()  # its login and HMAC key only
    for name in ("ca.crt", *(f"{d}.{ext}" for d in device_ids for ext in ("crt", "key"))):
        if (run / "secrets" / name).is_file():  # TLS: the CA, and client certificates when the lab has them
            files[f"secrets/{name}"] = (run / "secrets" / name).read_bytes()
    base = campaign.source.parent if campaign.source is not None else Path.cwd()
    groups = {g.name: g for d, g in campaign.devices() if d in device_ids}
    for g in groups.values():
        for spec in (g.availability, g.cpu):
            path = spec.get("path")
            if isinstance(path, str) and not Path(path).is_absolute():
                files[f"campaign/{path}"] = (base / path).read_bytes()
    return files


def _cause(exc: BaseException) -> BaseException:
    """The error a node raised, out of Ray's wrapper (so a ConfigError stays one clear line)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class ClusterRunner(CampaignRunner):
    def execute(self) -> dict[str, Any]:
        import ray

        spec = self.c.cluster
        assert spec is not None
        try:
            # log_to_driver=False: the devices' and actors' output goes to the run's logs/, not here.
            ray.init(address=spec.address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"[cluster] address {spec.address!r}: cannot connect to a Ray cluster ({exc}); "
                              "start one with `ray start --head` or set RAY_ADDRESS") from None
        try:
            return self._execute(ray)
        finally:
            ray.shutdown()

    def _execute(self, ray: Any) -> dict[str, Any]:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        alive = [n for n in ray.nodes() if n.get("Alive")]
        cpus = {n["NodeID"]: float(n.get("Resources", {}).get("CPU", 0.0)) for n in alive}
        address = {n["NodeID"]: str(n.get("NodeManagerAddress", "")) for n in alive}
        share = place_devices([d for d, _ in self.c.devices()], cpus)
        head_ip = ray.util.get_node_ip_address()
        if "://" not in self.broker_spec and any(address[n] != head_ip for n in share):
            # An embedded broker takes anonymous clients, so it listens on loopback only.
            raise ConfigError(f"[cluster]: devices on nodes other than this host ({head_ip}) need a broker they "
                              "all reach: set [broker] kind = \"url\" and url = \"mqtt://HOST:PORT\"")
        remote = ray.remote(num_cpus=0, max_restarts=0)(NodeLauncher)
        self.actors: dict[str, Any] = {
            node: remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                self.c, ids, int(cpus[node]), no_throttle=self.no_throttle)
            for node, ids in share.items()}
        self.share = share
        self.lost: dict[str, float] = {}
        sweep_and_report()  # the head's orphans (broker, server); a node's devices die with it (PDEATHSIG)
        self.ledger.open(self.run)
        started = time.monotonic()
        stack = contextlib.ExitStack()
        prepared = launched = False
        try:
            infos = self._calibrate(ray)
            # The largest any node needs: each node's own plan at that factor keeps every board's ratio.
            factor = max(i["dilation"].factor for i in infos.values())
            node_dilation = {n: dilation_at(i["dilation"], factor) for n, i in infos.items()}
            self.dilation = max(node_dilation.values(), key=lambda d: d.demand_cores / d.capacity_cores)
            for n, info in infos.items():
                print(f"node {n[:8]} ({info['hostname']}, {len(share[n])} devices): "
                      f"{node_dilation[n].describe()}", flush=True)
            threads = {d: t for i in infos.values() for d, t in i["threads"].items()}
            plans = [DevicePlan(d, g.board, g.profiles, g.name, threads[d]) for d, g in self.c.devices()]
            fresh_run_dir(self.run, self.force)
            prepared = True
            if self.c.source is not None:
                shutil.copy(self.c.source, self.run / "config.toml")
            data = DataPlan(self.c.model, self.c.dataset, self.c.data_root, self.c.partition, self.c.eval_fraction,
                            self.c.seed, self.c.samples, self.c.input_shape)
            prepare_run(self.run, data, plans, self._server_tables(plans),
                        keepalive_s=math.ceil(self.dilation.wall_s(self.c.keepalive_s)), offline=self.c.offline,
                        telemetry_hz=1.0 / factor, poll_s=DEFAULT_POLL_S * factor,
                        trainer_start_timeout_s=DEFAULT_TRAINER_START_TIMEOUT_S * factor)
            launched = True
            self._loop_cluster(ray, self._open_broker(stack).url, started, infos, node_dilation, address)
        except KeyboardInterrupt:
            self.stop_reason = "interrupted (Ctrl-C)"
        except BaseException as exc:
            self.stop_reason = f"error: {exc}"
            raise
        finally:
            self._shutdown_cluster(ray)
            self._finish(stack, prepared, launched)
        return self.summary

    def _calibrate(self, ray: Any) -> dict[str, dict[str, Any]]:
        refs = {n: a.calibrate.remote() for n, a in self.actors.items()}
        try:
            infos = {n: ray.get(r, timeout=CALIBRATE_TIMEOUT_S) for n, r in refs.items()}
        except Exception as exc:
            cause = _cause(exc)
            if isinstance(cause, OrchardError):
                raise cause from None
            raise OrchardError(f"[cluster]: a node failed to calibrate: {cause}") from None
        for node, info in infos.items():  # what killed launchers left on that node's host
            for line in info.get("swept", []):
                print(f"{line} (node {node})", file=sys.stderr, flush=True)
        return infos

    def _write_cluster_fleet(self, infos: dict[str, dict[str, Any]], node_dilation: dict[str, Dilation],
                             rows: dict[str, dict[str, Any]], address: dict[str, str]) -> None:
        node_of = {d: n for n, ids in self.share.items() for d in ids}
        backends = sorted({i["throttle_backend"] for i in infos.values()})
        assert self.dilation is not None
        fleet = {
            "campaign": self.c.name, "strategy": self.c.strategy, "throttle_backend": "+".join(backends),
            "throttle_warning": next((i["throttle_warning"] for i in infos.values() if i["throttle_warning"]), None),
            "time_dilation": self.dilation.factor,
            "dilation": {**self.dilation.as_dict(), "text": self.dilation.describe()},
            "dilation_warning": self.dilation.warning(),
            "nodes": [{"node": n, "address": address.get(n, ""), "hostname": i["hostname"], "cores": i["cores"],
                       "devices": self.share[n], "throttle_backend": i["throttle_backend"],
                       "host_speed_factor": round(i["host"].speed_factor, 4), "host_speed_source": i["host"].source,
                       "needed_dilation": i["dilation"].factor,  # what this node alone would have run at
                       "dilation": {**node_dilation[n].as_dict(), "text": node_dilation[n].describe()}}
                      for n, i in infos.items()],
            "devices": [{"id": d, "board": g.board, "group": g.name, "profile": g.profiles[0],
                         "profiles": list(g.profiles), "node": node_of[d],
                         "threads": infos[node_of[d]]["threads"][d], **rows.get(d, {"id": d}), "link": None}
                        for d, g in self.c.devices()],
        }
        (self.run / "fleet.json").write_text(json.dumps(fleet, indent=1, default=str) + "\n")

    def _loop_cluster(self, ray: Any, broker_url: str, started: float, infos: dict[str, dict[str, Any]],
                      node_dilation: dict[str, Dilation], address: dict[str, str]) -> None:
        self._broker_url = broker_url
        self._start_clock()
        self.server = self._spawn("server", ["-m", "server", "--config", str(self.run / "configs" / "server.toml"),
                                             "--out", str(self.run), "--broker", broker_url])
        events_path = self.run / "events.jsonl"
        while not events_path.exists():
            if self.server.poll() is not None:
                raise OrchardError(f"server exited at start (code {self.server.returncode}); see {self.run}/logs")
            time.sleep(0.05)
        self._events = events_path.open("a")
        self._event(event=EventName.CAMPAIGN_START, campaign=self.c.name, devices=self.c.n_devices,
                    nodes=len(self.actors))
        refs = {n: a.launch.remote(_files_for(self.run, self.c, self.share[n]), node_dilation[n], broker_url,
                                   self.start_unix) for n, a in self.actors.items()}
        rows: dict[str, dict[str, Any]] = {}
        for n, ref in refs.items():
            try:
                rows.update({r["id"]: r for r in ray.get(ref, timeout=CALIBRATE_TIMEOUT_S)})
            except Exception as exc:
                raise OrchardError(f"[cluster]: node {n[:8]} failed to start its devices: {_cause(exc)}") from None
        self._write_cluster_fleet(infos, node_dilation, rows, address)
        live = LiveView(self.run, self.c, [d for d, _ in self.c.devices()], lines_only=self.quiet)
        pending: dict[str, tuple[Any, float]] = {}
        while self.stop_reason is None:
            time.sleep(LOOP_S)
            self._drain(ray, pending)
            now = self._board_s(time.time())
            if self.server.poll() is not None:
                self.stop_reason = f"server finished (exit {self.server.returncode})"
            elif not self.actors:
                self.stop_reason = "every cluster node was lost"
            elif now > self.c.duration_board_s + STOP_GRACE_S:
                self.stop_reason = f"time limit {self.c.duration_board_s:.0f} board s reached"
            elif self.c.target_accuracy is not None and _best_accuracy(self.run) >= self.c.target_accuracy:
                self.stop_reason = f"target accuracy {self.c.target_accuracy} reached"
            live.render(now)
        live.close()

    def _drain(self, ray: Any, pending: dict[str, tuple[Any, float]]) -> None:
        """Node events into events.jsonl; a node whose actor died is lost (a fault, not an error)."""
        for n, actor in self.actors.items():
            if n not in pending:
                pending[n] = (actor.drain.remote(), time.monotonic())
        ready, _ = ray.wait([r for r, _ in pending.values()], num_returns=len(pending), timeout=0.5)
        for n, (ref, _since) in list(pending.items()):
            if ref not in ready:
                continue
            del pending[n]
            try:
                records = ray.get(ref)
            except Exception as exc:
                self._node_lost(n, _cause(exc))
                continue
            self._write_node_events(records)

    def _write_node_events(self, records: list[dict[str, Any]]) -> None:
        if self._events is None:
            return
        for record in records:
            self._events.write(json.dumps(record) + "\n")
        self._events.flush()

    def _node_lost(self, node: str, why: BaseException) -> None:
        self.actors.pop(node, None)
        self.lost[node] = self._board_s(time.time())
        print(f"warning: cluster node {node[:8]} lost ({type(why).__name__}); its {len(self.share[node])} devices "
              "are offline", file=sys.stderr, flush=True)
        self._event(event=EventName.NODE_LOST, node=node, devices=self.share[node], reason=type(why).__name__,
                    detail=str(why)[-2000:])

    def _shutdown_cluster(self, ray: Any) -> None:
        self._event(event=EventName.CAMPAIGN_STOPPING, reason=self.stop_reason or "error")
        refs = {n: a.stop.remote() for n, a in getattr(self, "actors", {}).items()}
        for n, ref in refs.items():
            try:
                result = ray.get(ref, timeout=60)
            except Exception as exc:
                if self._events is not None:
                    self._node_lost(n, _cause(exc))
                continue
            self._write_node_events(result["events"])
            if (self.run / "logs").is_dir():
                for name, blob in result["logs"].items():
                    (self.run / "logs" / name).write_bytes(blob)
        stop_process_groups([self.server] if self.server is not None else [], grace_s=4.0)
        self._event(event=EventName.CAMPAIGN_STOP, reason=self.stop_reason or "error")
        if self._events is not None:
            self._events.close()
            self._events = None
