"""How the testbed bench (bench/testbed_bench.py, whose docstring defines every figure) reports a
fleet point: which properties it broke, its one-line summaries and its brief table row."""

from __future__ import annotations

from typing import Any

from bench.testbed_sampler import CLASSES

KEEP_HZ = 0.9
KEEP_DELIVERED = 0.9
KEEP_CONTRIBUTED = 0.9
KEEP_QUOTA_TOLERANCE = 0.05  # the cgroups hold the quota dilation planned (fleet.json rounds to 4 decimals)


def _broken(r: dict[str, Any]) -> list[str]:
    """The properties a ladder point did not keep (empty: it keeps up)."""
    fleet = r.get("fleet") or {}
    hz, cpu = fleet.get("telemetry_hz_median"), (fleet.get("delivered_cpu") or {}).get("min")
    out = []
    if r.get("returncode") != 0 or "error" in r:
        out.append(f"run failed: {str(r.get('error'))[:160]}")
    if hz is None or hz < KEEP_HZ:
        out.append(f"telemetry median {_fmt(hz, '.3f')} Hz < {KEEP_HZ}")
    if cpu is None or cpu < KEEP_DELIVERED:
        out.append(f"delivered CPU min {_fmt(cpu, '.3f')} < {KEEP_DELIVERED}")
    if (r.get("contributed_fraction") or 0.0) < KEEP_CONTRIBUTED:
        out.append(f"contributed {_fmt(r.get('contributed_fraction'), '.2f')} < {KEEP_CONTRIBUTED}")
    if not (r.get("aggregations_per_board_min_2nd_half") or 0.0) > 0:
        out.append("no aggregation in the 2nd half")
    quota_ratio = fleet.get("quota_enforced_over_planned_max")
    if quota_ratio is not None and abs(quota_ratio - 1.0) > KEEP_QUOTA_TOLERANCE:
        out.append(f"enforced quota {quota_ratio:.2f}x the planned one")
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _overhead_line(label: str, r: dict[str, Any]) -> str:
    live = r.get("live") or {}
    whole = r.get("whole_command") or {}
    cpu = live.get("cpu_s", {})
    parts = ", ".join(f"{k} {_fmt(cpu.get(k), '.1f')}" for k in CLASSES[:4])
    return (f"  overhead {label:<8} live {_fmt(live.get('window_s'), '.1f')} s: harness "
            f"{_fmt(live.get('harness_cpu_s'), '.1f')} CPU-s = "
            f"{_fmt(live.get('harness_share_of_campaign_cpu'), '.1%')} of the campaign's CPU, "
            f"{_fmt(live.get('harness_share_of_host'), '.1%')} of the host ({parts}); "
            f"whole command {_fmt(r.get('command_wall_s'), '.0f')} s: harness "
            f"{_fmt(whole.get('harness_share_of_campaign_cpu'), '.1%')} of {_fmt(whole.get('campaign_cpu_s'), '.1f')}"
            f" CPU-s; host busy {_fmt(live.get('host_busy_fraction'), '.0%')}"
            f" (others {_fmt(live.get('foreign_busy_fraction'), '.0%')})")


def _scale_line(r: dict[str, Any]) -> str:
    live = r.get("live") or {}
    fleet = r.get("fleet") or {}
    cpu = fleet.get("delivered_cpu") or {}
    rss = fleet.get("rss") or {}
    head = f"  fleet N={r['n']:<3}"
    if "error" in r and fleet.get("telemetry_hz_median") is None:
        return f"{head} ERROR {r['error'][:200]}"
    verdict = "keeps up" if not r["broken"] else "does NOT keep up: " + "; ".join(r["broken"])
    return (f"{head} dilation {_fmt(fleet.get('dilation'), '.2f')}"
            f"  telemetry {_fmt(fleet.get('telemetry_hz_median'), '.3f')} Hz board"
            f" (min {_fmt(fleet.get('telemetry_hz_min'), '.2f')},"
            f" lag {_fmt(fleet.get('telemetry_lag_board_s_median'), '.1f')} s)"
            f"  delivered CPU median {_fmt(cpu.get('median'), '.3f')} min {_fmt(cpu.get('min'), '.3f')}"
            f" ({cpu.get('devices_measured')}/{cpu.get('devices')} devices)"
            f"  contributed {_fmt(r.get('contributed_fraction'), '.0%')}"
            f"  startup {_fmt(fleet.get('startup_board_s_median'), '.1f')} board s"
            f"  harness {_fmt(live.get('harness_share_of_campaign_cpu'), '.1%')} of campaign CPU /"
            f" {_fmt(live.get('harness_share_of_host'), '.1%')} of host"
            f"  RSS agent {_fmt(rss.get('agent_mb_median'), '.0f')}"
            f" + trainer {_fmt(rss.get('trainer_mb_median'), '.0f')} MB"
            f"  host busy {_fmt(live.get('host_busy_fraction'), '.0%')}"
            f" (others {_fmt(live.get('foreign_busy_fraction'), '.0%')})"
            f"  load {_fmt(r.get('loadavg_1m_end'), '.1f')}"
            f"  wall {_fmt(r.get('command_wall_s'), '.0f')} s -> {verdict}")


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    live, fleet = r.get("live") or {}, r.get("fleet") or {}
    cpu, rss = fleet.get("delivered_cpu") or {}, fleet.get("rss") or {}
    return {"n": r.get("n"), "keeps_up": r.get("keeps_up"), "broken": r.get("broken"),
            "dilation": fleet.get("dilation"), "quota_cores_per_device": fleet.get("quota_cores_per_device"),
            "telemetry_hz_board_median": fleet.get("telemetry_hz_median"),
            "telemetry_hz_board_min": fleet.get("telemetry_hz_min"),
            "telemetry_lag_board_s_median": fleet.get("telemetry_lag_board_s_median"),
            "delivered_cpu_median": cpu.get("median"), "delivered_cpu_min": cpu.get("min"),
            "quota_enforced_over_planned_max": fleet.get("quota_enforced_over_planned_max"),
            "trainer_delivered_cpu_median": (fleet.get("trainer_delivered_cpu") or {}).get("median"),
            "contributed_fraction": r.get("contributed_fraction"),
            "aggregations_per_board_min_2nd_half": r.get("aggregations_per_board_min_2nd_half"),
            "startup_board_s_median": fleet.get("startup_board_s_median"),
            "harness_share_of_campaign_cpu": live.get("harness_share_of_campaign_cpu"),
            "harness_share_of_host": live.get("harness_share_of_host"),
            "share_of_host": live.get("share_of_host"),
            "rss_agent_mb_median": rss.get("agent_mb_median"), "rss_trainer_mb_median": rss.get("trainer_mb_median"),
            "rss_device_mb_max": rss.get("device_mb_max"),
            "peak_rss_mb_median": {k: (r.get("memory") or {}).get(f"peak_{k}_rss_mb_median")
                                   for k in ("agent", "trainer", "tracker")},
            "peak_device_rss_mb": (r.get("memory") or {}).get("peak_device_rss_mb"),
            "host_busy_fraction": live.get("host_busy_fraction"),
            "foreign_busy_fraction": live.get("foreign_busy_fraction"),
            "device_cpu": r.get("device_cpu"),
            "loadavg_1m_end": r.get("loadavg_1m_end"), "command_wall_s": r.get("command_wall_s")}
