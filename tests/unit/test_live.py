"""The live view reads only the run folder and shows device states, progress and accuracy."""

from __future__ import annotations

import io
import json
from pathlib import Path

from testbed.campaign import load_campaign
from testbed.live import GREY, RESET, LiveView, visible

ROOT = Path(__file__).resolve().parents[2]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(tmp: Path) -> Path:
    run = tmp / "run"
    (run / "devices").mkdir(parents=True)
    events = [
        {"event": "device_status", "device": "pi4-0", "state": "training"},
        {"event": "task_sent", "device": "pi4-0", "profile": "width=0.5", "base_version": 3},
        {"event": "availability", "device": "pi5-0", "online": False},
        {"event": "oom", "device": "pi5-1", "oom_kills": 2},
        {"event": "update_accepted", "device": "pi4-0"},
        {"event": "update_rejected", "device": "pi5-1", "reason": "NaN"},
        {"event": "aggregated", "version": 4},
        {"event": "evaluate", "version": 4, "accuracy": 0.8125},
    ]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "trunc')
    (run / "devices" / "pi4-0.csv").write_text(
        "t_s,state,cpu_pct,rss_agent_mb,rss_trainer_mb,mem_limit_mb,cpu_quota_cores,power_w,energy_total_j,temp_c,power_source\n"
        "1.0,training,57.5,40.0,90.0,3584,0.22,5.0,12.5,,model\n")
    return run


def test_terminal_table_shows_devices_and_progress(tmp_path):
    campaign = load_campaign(ROOT / "campaigns" / "default.toml")
    out = Tty()
    view = LiveView(_run(tmp_path), campaign, ["pi4-0", "pi5-0", "pi5-1"], out=out, width=100)
    view.render(50.0)
    screen = visible(out.getvalue())
    assert "accuracy 0.8125" in screen and "1 accepted / 1 rejected" in screen
    assert "version 4/30" in screen and "50/100 board s" in screen
    row = next(line for line in screen.splitlines() if line.startswith("pi4-0"))
    assert "training" in row and "width=0.5" in row and "130" in row and "12.5" in row  # 40 + 90 MB
    assert "offline" in next(line for line in screen.splitlines() if line.startswith("pi5-0"))
    assert next(line for line in screen.splitlines() if line.startswith("pi5-1")).rstrip().endswith("2")


def test_ci_mode_prints_one_line_per_version_with_its_own_accuracy(tmp_path):
    campaign = load_campaign(ROOT / "campaigns" / "default.toml")
    run = _run(tmp_path)
    out = io.StringIO()
    view = LiveView(run, campaign, ["pi4-0"], lines_only=True, out=out)
    view.render(1.0)
    view.render(2.0)
    assert out.getvalue().count("\n") == 1 and "version 4 accuracy 0.8125" in out.getvalue()
    with (run / "events.jsonl").open("a") as f:  # the truncated line completes, then a new version
        f.write('"}\n' + json.dumps({"event": "aggregated", "version": 5}) + "\n")
    view.render(3.0)
    assert out.getvalue().count("\n") == 1  # version 5 is not evaluated yet: no line with 4's accuracy
    with (run / "events.jsonl").open("a") as f:
        f.write(json.dumps({"event": "aggregated", "version": 6}) + "\n")
        for version, accuracy in ((5, 0.875), (6, 0.9)):
            f.write(json.dumps({"event": "evaluate", "version": version, "accuracy": accuracy}) + "\n")
    view.render(4.0)
    assert [line.split("accepted")[0].split("] ")[1] for line in out.getvalue().splitlines()[1:]] == [
        "version 5 accuracy 0.8750 ", "version 6 accuracy 0.9000 "]


def test_frame_fits_the_terminal_width_dropping_the_least_useful_columns(tmp_path):
    campaign = load_campaign(ROOT / "campaigns" / "default.toml")
    run = _run(tmp_path)
    ids = ["pi4-0", "pi5-0", "a-very-long-device-name-0"]
    headers = {}
    for width in (30, 45, 60, 88, 120):
        lines = [visible(line) for line in LiveView(run, campaign, ids, out=Tty(), width=width).frame(50.0)]
        assert all(len(line) <= width for line in lines), (width, [len(x) for x in lines])
        headers[width] = lines[3].split()
    assert headers[120][:3] == ["device", "state", "profile"] and headers[120][-1] == "oom"
    assert "oom" not in headers[88] and "base" not in headers[88] and "energy" in headers[88]  # last go first
    assert headers[60] == ["device", "state", "profile"]
    assert headers[45] == ["device", "state"]
    assert headers[30] == ["device"]
    assert all(line.endswith("…") for line in LiveView(run, campaign, ids, out=Tty(), width=30).frame(50.0)[:2])


def test_offline_devices_are_greyed_and_come_back(tmp_path):
    campaign = load_campaign(ROOT / "campaigns" / "default.toml")
    run = _run(tmp_path)
    view = LiveView(run, campaign, ["pi4-0", "pi5-0", "pi5-1"], out=Tty(), width=100)
    view._ingest()
    rows = {visible(line).split()[0]: line for line in view.frame(1.0)[4:]}
    assert rows["pi5-0"].startswith(GREY) and rows["pi5-0"].endswith(RESET)
    assert not rows["pi4-0"].startswith(GREY)
    with (run / "events.jsonl").open("a") as f:
        f.write('"}\n' + "".join(json.dumps(e) + "\n" for e in [
            {"event": "availability", "device": "pi5-0", "online": True},
            {"event": "device_offline", "device": "pi4-0", "reason": "keepalive"},
            {"event": "device_exit", "device": "pi5-1", "code": 1}]))
    view._ingest()
    rows = {visible(line).split()[0]: line for line in view.frame(2.0)[4:]}
    assert not rows["pi5-0"].startswith(GREY) and "online" in rows["pi5-0"]
    assert rows["pi4-0"].startswith(GREY) and "offline" in rows["pi4-0"]
    assert rows["pi5-1"].startswith(GREY) and "failed" in rows["pi5-1"]


def test_close_draws_the_last_frame(tmp_path):
    campaign = load_campaign(ROOT / "campaigns" / "default.toml")
    run = _run(tmp_path)
    out = Tty()
    view = LiveView(run, campaign, ["pi4-0"], out=out, width=100)
    view.render(10.0)
    with (run / "events.jsonl").open("a") as f:  # the final version lands within the redraw throttle
        f.write('"}\n' + json.dumps({"event": "aggregated", "version": 9}) + "\n"
                + json.dumps({"event": "evaluate", "version": 9, "accuracy": 0.9375}) + "\n")
    view.render(10.2)
    assert "0.9375" not in out.getvalue()
    view.close()
    last = visible(out.getvalue().split("\x1b[2J")[-1])
    assert "accuracy 0.9375" in last and "version 9/30" in last and "10/100 board s" in last
