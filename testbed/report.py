"""The report of one run folder: `summary.json`, `plots/*.png` and a self-contained `report.html`.

`testbed.run_data.load_run` reads the run folder (its module doc gives the clock: every time is in
board seconds since the campaign start); `summarise` turns it into the headline figures;
`write_report` writes everything. Partial runs are reported for what ran.
`duration_board_s` of the run is the time of its last event, in board seconds (summaries written
before it had that name call it `wall_s`: `duration_board_s()` reads either).

Definitions (also written into summary.json under "definitions"):
- A *round* is the span between two aggregations; the first starts at the first `task_sent`.
  The updates merged in a round are the `update_accepted` events logged after the previous
  `aggregated` event and before its own (exactly the engine's pending list).
- time_to_target_s: time of the aggregation that published the first version whose accuracy
  reached config.toml's [stop] target_accuracy (server.csv t_s; null without a target).
- utilization (Co-S²P, methods.md §1.3): `U = Σ_i train_s_i / (N · T)`, with `train_s_i` the
  device-reported training time of every update merged into a published version, N the number
  of devices in the fleet (fleet.json, else every device seen in the run), and T the time from
  the first dispatch to the last aggregation (= Σ of the round lengths). Per round, the same
  ratio over that round's updates and length.
- device train_s: Σ device-reported `train_s` of its accepted updates (the time its trainer
  worked on tasks that counted); `timeline_training_s` is the time in the 'training' state.
- idle_s / offline_s: time in idle|online / offline state on the timeline built from
  device_status, device_hello, device_offline, device_exit (failed) and availability events,
  until the last event.
- device energy_j: telemetry's cumulative energy at its last sample; a drop (agent restart)
  starts a new segment whose energy is added.
- energy per round: `energy_j_updates` is Σ of the merged updates' `energy_j` (training only);
  `energy_j_telemetry` is the whole fleet's telemetry energy (idle included) between the round's
  start and end, interpolated between samples (a trace is flat outside its samples; None
  when no device has two samples).
- energy_to_target_j: the whole fleet's telemetry energy (idle included) from each device's start
  up to time_to_target_s (null when the target was not reached).
- bytes per round: `bytes_down` is every task and artifact frame the server sent, `bytes_up` every
  update frame it received (refused ones too), after the previous aggregation and up to this one;
  counted as the MQTT payloads the broker carried (the frame plus its chunk headers).
- accuracy per profile: the server scores the global model and, at every version, each fixed
  submodel profile (a width or class subset; rolling windows move each round) on the held-out split.
  `served_profile` is the model the run serves: the global model ("dense") when some device trains
  all of it (dense, or a rolling window that visits every channel), else the widest submodel any
  device trains (an untrained part of the model is not scored). final_accuracy, best_accuracy and
  time_to_target_s are those of the served model.
- groups (tiers: one [[fleet]] group each): the accuracy of the model the group trains (its
  profile's, the global model's for dense or rolling), its devices' updates, train_s, energy_j,
  peak_rss_mb (telemetry, agent + trainer), step_ms_median (median over its updates'
  device-reported median step times: a step that fits in one CFS quota burst runs at host speed,
  so this shows the host's step, not the board's) and task_step_ms_median (median over its
  updates of train_s / local_steps: the board's average step, throttling included).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from testbed.fidelity import check as check_fidelity
from testbed.run_data import STATES, RunData, load_run


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _link_columns(link: Any) -> dict[str, Any]:
    """A shaped device's caps (board Mbit/s) and the bytes its veth carried (fleet.json `link`)."""
    if not isinstance(link, dict):
        return {}
    return {f"link_{k}": link.get(k) for k in ("kind", "up_mbit", "down_mbit", "bytes_up", "bytes_down")}


def summarise(data: RunData) -> dict[str, Any]:
    """The headline figures of a run (see the module docstring for the definitions)."""
    from testbed import breakdown

    rounds, n_fleet = data.rounds, max(1, len(data.devices))
    curve = breakdown.served_curve(data)  # (t_s, version, accuracy) of the model the run serves
    target = data.target_accuracy
    reached = [t for t, _, a in curve if target is not None and a >= target]
    merged = [r for r in rounds if r.logged and r.start_s is not None]
    span_s = (merged[-1].t_s - merged[0].start_s) if merged and merged[0].start_s is not None else 0.0
    fleet_by_id = {str(d.get("id")): d for d in (data.fleet or {}).get("devices", []) if isinstance(d, dict)}
    devices = []
    for device in data.devices:
        mine = [u for u in data.updates if u.device == device]
        spent = {s: 0.0 for s in STATES}
        for seg in data.timeline.get(device, []):
            spent[seg.state] += seg.end_s - seg.start_s
        trace = data.traces.get(device)
        ooms = data.ooms.get(device, [])
        devices.append({
            "id": device, "board": data.boards.get(device, ""),
            **{k: fleet_by_id.get(device, {}).get(k) for k in ("group", "profile", "cpu_quota_cores", "mem_limit_mb")},
            **({"node": fleet_by_id[device]["node"]} if "node" in fleet_by_id.get(device, {}) else {}),
            "profiles": sorted({u.profile for u in mine if u.profile}),
            "updates": len(mine), "train_s": _r(sum(u.train_s for u in mine)),
            "timeline_training_s": _r(spent["training"]), "idle_s": _r(spent["idle"] + spent["online"]),
            "offline_s": _r(spent["offline"]),
            "peak_rss_mb": _r(float(np.max(trace.rss_agent_mb + trace.rss_trainer_mb)), 1) if trace else None,
            "energy_j": _r(float(trace.energy_j[-1])) if trace else None,
            "energy_source": trace.power_source if trace else None,
            "oom_count": max([len(ooms), *(k for _, k in ooms)]),  # oom_kills is the cgroup's cumulative counter
            **_link_columns(fleet_by_id.get(device, {}).get("link")),
        })
    fleet = data.fleet or {}
    fidelity = check_fidelity(data.run_dir, fleet)
    for d in devices:
        d["cpu_delivered"] = fidelity["delivered_cpu"].get(d["id"], {}).get("ratio")
    energies = [float(tr.energy_j[-1]) for d, tr in data.traces.items() if d in data.devices]
    time_to_target_s = reached[0] if reached else None
    return {
        "run": str(data.run_dir), "campaign": data.campaign, "strategy": data.strategy,
        "duration_board_s": _r(data.end_s), "rounds": len(rounds), "n_devices": len(data.devices),
        "served_profile": breakdown.served_profile(data),
        "final_accuracy": curve[-1][2] if curve else None,
        "best_accuracy": max(a for _, _, a in curve) if curve else None,
        "target_accuracy": target, "time_to_target_s": _r(time_to_target_s),
        "energy_to_target_j": _r(breakdown.energy_until_j(data, time_to_target_s)),
        "updates_accepted": len(data.updates), "updates_rejected": data.rejected,
        "utilization": _r(sum(r.train_s for r in merged) / (n_fleet * span_s), 4) if span_s > 0 else None,
        "train_s_total": _r(sum(u.train_s for u in data.updates)),
        "energy_j_total": _r(sum(energies)) if energies else None,
        "bytes_up_total": data.bytes_up, "bytes_down_total": data.bytes_down,
        "throttle_backend": (data.fleet or {}).get("throttle_backend"),
        "throttle_warning": (data.fleet or {}).get("throttle_warning"),
        "time_dilation": fleet.get("time_dilation"), "host_speed_factor": fleet.get("host_speed_factor"),
        "host_speed_source": fleet.get("host_speed_source"), "dilation": fleet.get("dilation"),
        "dilation_warning": fleet.get("dilation_warning"), "fidelity": fidelity,
        "stop_reason": data.stop_reason, "warnings": data.warnings,
        "accuracy_per_profile": breakdown.final_profile_accuracy(data),
        "groups": breakdown.group_rows(data, devices), "devices": devices,
        "wasted_work": wasted_work_figures(data), "never_joined": data.never_joined,
        **({"nodes": fleet["nodes"], "nodes_lost": data.nodes_lost} if "nodes" in fleet else {}),
        "per_round": [{"version": r.version, "t_s": _r(r.t_s), "start_s": _r(r.start_s), "accuracy": r.accuracy,
                       "loss": r.loss, "train_loss": _r(r.train_loss, 4), "n_updates": r.n_updates,
                       "train_s": _r(r.train_s), "utilization": _r(r.utilization, 4),
                       "energy_j_updates": _r(r.energy_j_updates), "energy_j_telemetry": _r(r.energy_j_telemetry),
                       "bytes_up": r.bytes_up, "bytes_down": r.bytes_down,
                       **{f"accuracy[{p}]": a for p, a in sorted(r.profile_accuracy.items())}}
                      for r in rounds],
        "definitions": DEFINITIONS,
    }


LEGACY_DURATION_KEY = "wall_s"  # duration_board_s's name in run folders from before it said board seconds


def duration_board_s(summary: dict[str, Any]) -> float:
    """A summary's run duration in board seconds, from an old run folder's summary.json too."""
    value = summary.get("duration_board_s", summary.get(LEGACY_DURATION_KEY))
    return float(value) if isinstance(value, (int, float)) else 0.0


# The docstring's definitions, one string each, for summary.json and report.html (one source).
DEFINITIONS = [" ".join(item.split()) for item in (__doc__ or "").split("Definitions")[-1].split("\n- ")[1:]]


def render_html(summary: dict[str, Any], data: RunData, pngs: list[Path]) -> str:
    from testbed.compare import format_cell, html_page, html_table, png_figure

    title = f"{summary['campaign']} — {summary['strategy'] or 'unknown strategy'}"
    parts = [f"<h1>Orchard report: {html.escape(title)}</h1>"]
    if summary.get("throttle_warning"):
        parts.append(f"<p class='warn'>⚠ THROTTLING: {html.escape(str(summary['throttle_warning']))}</p>")
    if summary.get("throttle_backend") == "none":
        parts.append("<p class='warn'>⚠ No throttle backend: devices ran at host speed and memory; "
                     "times, memory and energy do not represent the boards.</p>")
    if isinstance(summary.get("dilation"), dict) and summary["dilation"].get("text"):
        parts.append(f"<p class='note'>{html.escape(str(summary['dilation']['text']))}</p>")
    if summary.get("dilation_warning"):
        parts.append(f"<p class='warn'>⚠ {html.escape(str(summary['dilation_warning']))}</p>")
    parts += [f"<p class='warn'>⚠ CPU NOT DELIVERED: {html.escape(w)}</p>" for w in summary["fidelity"]["warnings"]]
    parts += [f"<p class='note'>{html.escape(w)}</p>" for w in summary["warnings"]]
    parts += [f"<p class='warn'>⚠ CLUSTER NODE LOST at {n['t_s']} board s: {html.escape(str(n['node']))}; its "
              f"devices {html.escape(' '.join(n['devices'] or []))} went offline</p>"
              for n in summary.get("nodes_lost", [])]
    headline = [{"figure": k, "value": format_cell(v)} for k, v in summary.items() if not isinstance(v, (list, dict))]
    parts.append("<h2>Summary</h2>" + html_table(headline, ["figure", "value"]))
    columns = ["id", "board", "group", *(["node"] if "nodes" in summary else []), "cpu_quota_cores", "mem_limit_mb",
               "profiles", "updates", "train_s",
               "timeline_training_s", "idle_s", "offline_s", "peak_rss_mb", "energy_j", "energy_source", "oom_count",
               "cpu_delivered"]
    columns += [k for k in ("link_kind", "link_up_mbit", "link_down_mbit", "link_bytes_up", "link_bytes_down")
                if any(k in d for d in summary["devices"])]
    if summary["groups"]:
        parts.append("<h2>Tiers ([[fleet]] groups)</h2>" + html_table(summary["groups"], list(summary["groups"][0])))
    per_profile = [{"profile": p, "final accuracy": a} for p, a in summary["accuracy_per_profile"].items()]
    parts.append("<h2>Accuracy per profile</h2>" + html_table(per_profile, ["profile", "final accuracy"]))
    parts.append("<h2>Devices</h2>" + html_table(summary["devices"], columns))
    parts.append(render_wasted_work(summary))
    parts.append("<h2>Plots</h2>" + "".join(png_figure(p) for p in pngs))
    if summary["per_round"]:
        round_columns = list(dict.fromkeys(k for row in summary["per_round"] for k in row))
        parts.append("<h2>Rounds</h2>" + html_table(summary["per_round"], round_columns))
    parts.append("<h2>Definitions</h2><ul>" + "".join(f"<li>{html.escape(d)}</li>" for d in DEFINITIONS) + "</ul>")
    if data.fleet is not None:
        parts.append(f"<h2>fleet.json</h2><pre>{html.escape(json.dumps(data.fleet, indent=1))}</pre>")
    if data.config_text is not None:
        parts.append(f"<h2>config.toml</h2><pre>{html.escape(data.config_text)}</pre>")
    return html_page(title, "".join(parts))


def write_report(run_dir: Path) -> dict[str, Any]:
    """Write plots/*.png, summary.json and report.html (PNGs embedded as data URIs, so the file
    travels alone) into `run_dir`; returns the summary. Keys of an existing summary.json that the
    report does not compute (e.g. the federation's server_exit) are kept, in the file and in the
    returned dict."""
    from testbed import plots  # matplotlib loads only when plots are drawn

    data = load_run(Path(run_dir))
    summary = summarise(data)
    pngs = plots.write_plots(data, data.run_dir / "plots", summary["warnings"], summary["utilization"])
    old_path = data.run_dir / "summary.json"
    try:
        old = json.loads(old_path.read_text()) if old_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = {}
    old = {k: v for k, v in old.items() if k != LEGACY_DURATION_KEY} if isinstance(old, dict) else {}
    merged = {**old, **summary}
    old_path.write_text(json.dumps(merged, indent=1) + "\n")
    (data.run_dir / "report.html").write_text(render_html(summary, data, pngs))
    return merged


# ---------------------------------------------------------------- wasted work, devices that never joined
def wasted_work_figures(data: RunData) -> dict[str, Any]:
    """summary.json's `wasted_work`: device-seconds whose update was refused or abandoned
    (definitions in server/waste.py), in total and per device of the fleet."""
    work = data.work
    fraction = work.wasted_fraction
    per_device = {}
    for device in data.devices:
        d = work.devices.get(device)
        per_device[device] = {"wasted_s": _r(d.wasted_s if d else 0.0), "useful_s": _r(d.useful_s if d else 0.0),
                              "unfinished_s": _r(d.unfinished_s if d else 0.0),
                              "tasks_wasted": d.tasks_wasted if d else 0,
                              "wasted_energy_j": _r(d.wasted_energy_j if d else 0.0)}
    return {"wasted_s": _r(work.wasted_s), "useful_s": _r(work.useful_s), "wasted_energy_j": _r(work.wasted_energy_j),
            "wasted_fraction": _r(fraction, 4) if fraction is not None else None, "devices": per_device}


def render_wasted_work(summary: dict[str, Any]) -> str:
    """The report's wasted-work section (and the devices that never joined)."""
    from testbed.compare import html_table

    work = summary["wasted_work"]
    fraction = work["wasted_fraction"]
    share = "n/a" if fraction is None else f"{100 * fraction:.1f} %"
    parts = [f"<h2>Wasted work</h2><p>{work['wasted_s']} device-seconds of {work['wasted_s'] + work['useful_s']:.3f} "
             f"went into updates that were refused or abandoned ({share}); refused updates reported "
             f"{work['wasted_energy_j']} J.</p>"]
    rows = [{"id": device, **figures} for device, figures in work["devices"].items()]
    parts.append(html_table(rows, ["id", "useful_s", "wasted_s", "unfinished_s", "tasks_wasted", "wasted_energy_j"]))
    if summary["never_joined"]:
        parts.append("<h2>Devices that never joined</h2>" + html_table(summary["never_joined"], ["id", "reason"]))
    return "".join(parts)


def failure_line(summary: dict[str, Any]) -> str | None:
    """One line saying why a run that made no aggregation failed, naming the devices that never
    said hello and why; None when it made at least one. `orchard campaign run` and `orchard
    federate` print it and exit 1."""
    if summary.get("rounds"):
        return None
    line = f"campaign {summary.get('campaign')!r} made 0 aggregations ({summary.get('stop_reason') or 'stopped'})"
    never = summary.get("never_joined") or []
    if never:
        line += f": {len(never)} of {summary.get('n_devices')} devices never said hello: "
        line += ", ".join(d["id"] for d in never) + " (" + "; ".join(f"{d['id']}: {d['reason']}" for d in never) + ")"
    return " ".join(line.split())  # one line, whatever a log line held
