"""Reports: summary figures on a hand-written run folder with known answers, plots and HTML,
partial runs, errors, comparisons, and the format a real federation writes."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import ConfigError
from testbed.compare import compare_runs
from testbed.report import duration_board_s, write_report
from testbed.run_data import load_run

T0 = 1_700_000_000.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SERVER_HEADER = ["round", "version", "t_s", "accuracy", "loss", "n_updates", "accepted_total", "rejected_total",
                 "staleness_mean", "staleness_max", "devices", "reason"]
DEVICE_HEADER = ["t_s", "state", "cpu_pct", "rss_agent_mb", "rss_trainer_mb", "mem_limit_mb", "cpu_quota_cores",
                 "power_w", "energy_total_j", "temp_c", "power_source"]


def ev(t_s: float, event: str, **fields: Any) -> dict[str, Any]:
    return {"event": event, "t": t_s, **fields, "wall_t": T0 + t_s}


# Device a trains twice and both updates are merged; b starts a task, is taken offline by the
# availability trace at 6 s (and OOM-killed), comes back at 10 s, and gets one update rejected.
EVENTS = [
    ev(0, "server_start", version=0, strategy="semi-async"),
    ev(0, "availability", device="a", online=True), ev(0, "availability", device="b", online=True),
    ev(1, "device_hello", device="a", board="rpi4b-4gb", n_samples=100),
    ev(1, "device_status", device="a", state="idle", task_id=None, detail=""),
    ev(1, "device_hello", device="b", board="jetson-nano", n_samples=100),
    ev(1, "device_status", device="b", state="idle", task_id=None, detail=""),
    ev(2, "task_sent", t=2.0, round=0, version=0, device="a", task_id="t1", base_version=0, profile="dense"),
    ev(2, "task_sent", t=2.0, round=0, version=0, device="b", task_id="t2", base_version=0, profile="width=0.5"),
    ev(2, "device_status", device="a", state="training", task_id="t1", detail=""),
    ev(2, "device_status", device="b", state="training", task_id="t2", detail=""),
    ev(4, "device_status", device="a", state="uploading", task_id="t1", detail=""),
    ev(4.5, "update_accepted", device="a", task_id="t1", staleness=0, n_samples=100, train_s=2.0, energy_j=10.0),
    ev(4.5, "device_status", device="a", state="idle", task_id=None, detail=""),
    ev(5, "aggregated", t=5.0, round=1, version=1, closed_round=0, reason="K", devices=["a"], staleness=[0]),
    ev(5, "evaluate", version=1, accuracy=0.4, loss=1.5, t=5.0),
    ev(5, "task_sent", t=5.0, round=1, version=1, device="a", task_id="t3", base_version=1, profile="dense"),
    ev(5, "device_status", device="a", state="training", task_id="t3", detail=""),
    ev(6, "availability", device="b", online=False),
    ev(8, "device_status", device="a", state="uploading", task_id="t3", detail=""),
    ev(8.5, "update_accepted", device="a", task_id="t3", staleness=1, n_samples=100, train_s=3.0, energy_j=12.0),
    ev(8.5, "device_status", device="a", state="idle", task_id=None, detail=""),
    ev(9, "aggregated", t=9.0, round=2, version=2, closed_round=1, reason="K", devices=["a"], staleness=[1]),
    ev(9, "evaluate", version=2, accuracy=0.6, loss=1.0, t=9.0),
    ev(9, "oom", device="b", oom_kills=1),
    ev(10, "availability", device="b", online=True),
    ev(10.5, "device_status", device="b", state="idle", task_id=None, detail=""),
    ev(11, "update_rejected", device="b", task_id="t2", reason="task was abandoned"),
    ev(12, "server_stop", version=2, reason="reached version 2"),
]
SERVER_ROWS = [
    [0, 1, 5.0, 0.4, 1.5, 1, 1, 0, 0.0, 0, "a", "K"],
    [1, 2, 9.0, 0.6, 1.0, 1, 2, 0, 1.0, 1, "a", "K"],
]
# (t_s, energy_j, rss_agent_mb, rss_trainer_mb); b's agent restarts between 7 and 10 s.
TELEMETRY = {
    "a": [(1, 0.0, 50, 0), (5, 20.0, 50, 100), (9, 40.0, 50, 100), (12, 50.0, 50, 0)],
    "b": [(1, 0.0, 60, 0), (5, 8.0, 60, 200), (7, 10.0, 60, 200), (10, 1.0, 55, ""), (12, 3.0, 55, "")],
}
FLEET = {"campaign": "known", "strategy": "semi-async", "throttle_backend": "cgroup1",
         "throttle_warning": "memory cap not enforced on this kernel",
         "devices": [{"id": "a", "board": "rpi4b-4gb", "group": "g", "profile": "dense", "cpu_quota_cores": 1.0,
                      "mem_limit_mb": 512, "power_source": "model"},
                     {"id": "b", "board": "jetson-nano", "group": "g", "profile": "width=0.5",
                      "cpu_quota_cores": 0.5, "mem_limit_mb": 256, "power_source": "model"}]}
CONFIG = '[campaign]\nname = "known"\n\n[stop]\ntarget_accuracy = 0.5  # <verbatim>\n'


def make_run(root: Path, name: str = "known", fleet: dict[str, Any] | None = FLEET,
             config: str | None = CONFIG) -> Path:
    run = root / name
    (run / "devices").mkdir(parents=True)
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    with (run / "server.csv").open("w", newline="") as f:
        csv.writer(f).writerows([SERVER_HEADER, *SERVER_ROWS])
    for device, rows in TELEMETRY.items():
        limit = 512 if device == "a" else 256
        with (run / "devices" / f"{device}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(DEVICE_HEADER)
            w.writerows([t, "idle", 50.0, agent, trainer, limit, 1.0, 2.0, e, "", "model:2-5W"]
                        for t, e, agent, trainer in rows)
    if fleet is not None:
        (run / "fleet.json").write_text(json.dumps(fleet))
    if config is not None:
        (run / "config.toml").write_text(config)
    return run


def test_summary_figures_match_the_known_run(tmp_path: Path) -> None:
    s = write_report(make_run(tmp_path))
    assert (s["campaign"], s["strategy"], s["throttle_backend"]) == ("known", "semi-async", "cgroup1")
    assert (s["rounds"], s["duration_board_s"], s["n_devices"]) == (2, 12.0, 2)
    assert (s["final_accuracy"], s["best_accuracy"], s["target_accuracy"]) == (0.6, 0.6, 0.5)
    assert s["time_to_target_s"] == 9.0
    assert (s["updates_accepted"], s["updates_rejected"]) == (2, 1)
    # Σ merged train_s = 2 + 3; N = 2 fleet devices; first dispatch 2 s -> last aggregation 9 s.
    assert s["utilization"] == round(5.0 / (2 * 7.0), 4)
    a, b = s["devices"]
    assert a == {**a, "id": "a", "board": "rpi4b-4gb", "profiles": ["dense"], "updates": 2, "train_s": 5.0,
                 "timeline_training_s": 5.0, "idle_s": 6.0, "offline_s": 0.0, "peak_rss_mb": 150.0,
                 "energy_j": 50.0, "energy_source": "model:2-5W", "oom_count": 0}
    # b: training 2-6, offline 6-10 (availability), online 10-10.5, idle 10.5-12; restart added back.
    assert b == {**b, "id": "b", "profiles": [], "updates": 0, "train_s": 0.0, "timeline_training_s": 4.0,
                 "offline_s": 4.0, "idle_s": 4.0, "peak_rss_mb": 260.0, "energy_j": 13.0, "oom_count": 1}
    assert s["energy_j_total"] == 63.0
    r1, r2 = s["per_round"]
    assert (r1["start_s"], r1["t_s"], r1["train_s"], r1["utilization"]) == (2.0, 5.0, 2.0, round(2 / 6, 4))
    assert (r2["start_s"], r2["t_s"], r2["train_s"], r2["utilization"]) == (5.0, 9.0, 3.0, 0.375)
    assert (r1["energy_j_updates"], r2["energy_j_updates"]) == (10.0, 12.0)
    # a: 20-5 and 40-20; b: 8-2, then (8 -> 10 at 7 s -> 11 at 10 s, so 10.667 at 9 s) - 8.
    assert (r1["energy_j_telemetry"], r2["energy_j_telemetry"]) == (21.0, round(20 + 8 / 3, 3))
    assert s["warnings"] == []
    assert json.loads((tmp_path / "known" / "summary.json").read_text())["utilization"] == s["utilization"]


def test_plots_and_self_contained_html(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    write_report(run)
    names = {"accuracy", "loss", "bytes", "timeline", "cpu", "memory", "energy", "staleness", "utilization"}
    for name in names:
        png = (run / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5000, name
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(names) and "src=\"plots/" not in page
    first = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(first).startswith(PNG_MAGIC)
    assert "THROTTLING: memory cap not enforced on this kernel" in page
    assert "target_accuracy = 0.5  # &lt;verbatim&gt;" in page  # config.toml, verbatim and escaped


def test_run_without_fleet_or_config_takes_devices_from_events(tmp_path: Path) -> None:
    s = write_report(make_run(tmp_path, fleet=None, config=None))
    assert [d["id"] for d in s["devices"]] == ["a", "b"]
    assert s["devices"][1]["board"] == "jetson-nano"
    assert (s["campaign"], s["time_to_target_s"], s["throttle_backend"]) == ("known", None, None)
    assert "THROTTLING" not in (tmp_path / "known" / "report.html").read_text()


def test_partial_run_reports_what_ran(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    # Killed just after version 1 was evaluated: events end in half a line, server.csv never
    # got its row flushed, and one telemetry line is cut.
    cut = next(i for i, e in enumerate(EVENTS) if e["event"] == "evaluate") + 1
    text = "".join(json.dumps(e) + "\n" for e in EVENTS[:cut])
    (run / "events.jsonl").write_text(text + json.dumps(EVENTS[cut])[:20])
    (run / "server.csv").write_text(",".join(SERVER_HEADER) + "\n0,1,5.0,0.4")
    telemetry = (run / "devices" / "a.csv").read_text()
    (run / "devices" / "a.csv").write_text(telemetry[: telemetry.rindex("\n", 0, -1) + 9])
    s = write_report(run)
    assert (s["rounds"], s["final_accuracy"], s["updates_accepted"], s["duration_board_s"]) == (1, 0.4, 1, 5.0)
    assert s["utilization"] == round(2.0 / (2 * 3.0), 4)
    assert any("cut short" in w for w in s["warnings"]) and any("unreadable line" in w for w in s["warnings"])
    assert all((run / "plots" / f"{n}.png").stat().st_size > 5000 for n in ("accuracy", "timeline", "memory"))
    assert "cut short" in (run / "report.html").read_text()


def test_empty_run_still_reports(tmp_path: Path) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    (run / "events.jsonl").write_text("")
    (run / "server.csv").write_text(",".join(SERVER_HEADER) + "\n")
    s = write_report(run)
    assert (s["rounds"], s["final_accuracy"], s["utilization"], s["devices"]) == (0, None, None, [])
    assert (run / "report.html").stat().st_size > 1000


def test_missing_folder_or_files_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run folder .*nowhere does not exist") as err:
        write_report(tmp_path / "nowhere")
    assert "\n" not in str(err.value)
    run = make_run(tmp_path)
    (run / "server.csv").unlink()
    with pytest.raises(ConfigError, match=r"has no server\.csv"):
        write_report(run)
    run = make_run(tmp_path, name="other")
    (run / "events.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"has no events\.jsonl"):
        write_report(run)


def test_resumed_server_csv_times_continue_from_the_second_start(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    # The server restarted at 20 s (--resume): its engine clock, and so wall_s, starts again at 0.
    more = [ev(20, "server_start", version=2, strategy="semi-async", resume=True),
            ev(21, "task_sent", device="a", task_id="t4", base_version=2, profile="dense"),
            ev(21, "device_exit", device="b", code=1), ev(22, "device_hello", device="b", board="jetson-nano"),
            ev(22.5, "update_accepted", device="a", task_id="t4", staleness=0, train_s=1.0, energy_j=0.0),
            ev(23, "aggregated", version=3, closed_round=2, devices=["a"], staleness=[0]),
            ev(24, "server_stop", version=3, reason="reached version 3")]
    with (run / "events.jsonl").open("a") as f:
        f.writelines(json.dumps(e) + "\n" for e in more)
    with (run / "server.csv").open("a", newline="") as f:
        csv.writer(f).writerow([2, 3, 3.0, 0.7, 0.9, 1, 3, 1, 0.0, 0, "a", "K"])
    s = write_report(run)
    assert [r["t_s"] for r in s["per_round"]] == [5.0, 9.0, 23.0]
    assert (s["final_accuracy"], s["duration_board_s"], s["per_round"][2]["start_s"]) == (0.7, 24.0, 9.0)
    b = [(seg.state, seg.start_s, seg.end_s) for seg in load_run(run).timeline["b"]]
    assert b[-3:] == [("idle", 10.5, 21.0), ("failed", 21.0, 22.0), ("online", 22.0, 24.0)]


def test_existing_summary_keys_are_kept(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    (run / "summary.json").write_text(json.dumps({"server_exit": 0, "rounds": 99}))
    write_report(run)
    saved = json.loads((run / "summary.json").read_text())
    assert (saved["server_exit"], saved["rounds"]) == (0, 2)


def test_compare_two_runs(tmp_path: Path) -> None:
    a = make_run(tmp_path)
    b = make_run(tmp_path, name="fedavg-run", fleet={**FLEET, "campaign": "other", "strategy": "fedavg"})
    out = tmp_path / "cmp"
    table = compare_runs([a, b], out)
    assert [r["label"] for r in table["rows"]] == ["known / semi-async", "other / fedavg"]
    assert table["rows"][0]["utilization"] == round(5 / 14, 4) and table["rows"][0]["time_to_target_s"] == 9.0
    assert (out / "compare_accuracy.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "compare_accuracy.png").stat().st_size > 10_000
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["campaign"] for r in rows] == ["known", "other"] and rows[0]["final_accuracy"] == "0.6"
    md = (out / "compare.md").read_text().splitlines()
    assert len(md) == 4 and md[0].startswith("| label | run |")
    assert "data:image/png;base64," in (out / "compare.html").read_text()
    assert not (a / "report.html").exists()  # comparing reads the runs, never writes into them


def test_compare_same_labels_are_told_apart_and_errors(tmp_path: Path) -> None:
    a, b = make_run(tmp_path, name="r1"), make_run(tmp_path, name="r2")
    labels = [r["label"] for r in compare_runs([a, b], tmp_path / "cmp")["rows"]]
    assert labels == ["known / semi-async (r1)", "known / semi-async (r2)"]
    with pytest.raises(ConfigError, match="missing does not exist"):
        compare_runs([a, tmp_path / "missing"], tmp_path / "cmp2")
    assert not (tmp_path / "cmp2").exists()
    with pytest.raises(ConfigError, match="at least one"):
        compare_runs([], tmp_path / "cmp3")


@pytest.mark.integration
def test_report_of_a_real_federation(tmp_path: Path) -> None:
    from testbed.federate import FederationSpec, run_federation

    run = tmp_path / "fed"
    run_federation(FederationSpec(out=run, devices=2, rounds=2, model="lenet", local_steps=5))
    s = write_report(run)
    assert s["rounds"] == 2 and s["final_accuracy"] is not None and s["strategy"] == "semi-async"
    assert [d["id"] for d in s["devices"]] == ["dev0", "dev1"]
    assert s["updates_accepted"] >= 2 and 0 < s["utilization"] <= 1
    assert all(d["board"] and d["peak_rss_mb"] and d["energy_source"] for d in s["devices"])
    assert sum(d["updates"] for d in s["devices"]) == s["updates_accepted"]
    assert s["warnings"] == [] and s["server_exit"] == 0  # the federation's own summary key is kept
    assert (run / "report.html").stat().st_size > 50_000


def test_old_run_folders_name_the_duration_wall_s_and_still_read(tmp_path: Path) -> None:
    # Before duration_board_s said it was board seconds, summary.json called it wall_s.
    run = make_run(tmp_path)
    (run / "summary.json").write_text(json.dumps({"wall_s": 12.0, "server_exit": 0}))
    assert duration_board_s(json.loads((run / "summary.json").read_text())) == 12.0
    rebuilt = write_report(run)  # `orchard report` on the old folder: one name, the new one
    assert rebuilt["duration_board_s"] == 12.0 and "wall_s" not in rebuilt and rebuilt["server_exit"] == 0
    assert "wall_s" not in json.loads((run / "summary.json").read_text())
    assert duration_board_s({"duration_board_s": 3.5, "wall_s": 9.0}) == 3.5
