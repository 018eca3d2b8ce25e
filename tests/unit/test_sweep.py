"""Sweep files: variants override the parsed campaign before it is validated, every variant and
seed is checked before any run, and the table and bands come out right for known runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import tomllib

from runtime.errors import EXIT_CONFIG, ConfigError
from testbed.campaign import Campaign, load_campaign
from testbed.sweep import (
    RunRecord,
    check_out,
    dump_toml,
    load_sweep,
    parse_seeds,
    run_sweep,
    single_plan,
    table_from_runs,
    variant_tables,
)
from testbed.sweep_table import _band, write_sweep
from tests.unit.test_report import make_run
from tests.unit.test_report_breakdown import EVENTS, EXTRA, run_with

ROOT = Path(__file__).resolve().parents[2]
BASE = '''
[campaign]
name = "cw"
[stop]
duration_board_s = 30
[model]
name = "mlp"
partition = "dirichlet:0.5"
[strategy]
name = "semi-async"
k_fraction = 0.5
[train]
local_steps = 5
lr = 0.1
[[fleet]]
name = "big"
board = "jetson-orin-nano"
count = 1
profile = "dense"
[[fleet]]
name = "small"
board = "rpi-zero2w"
count = 2
profile = "width=0.5"
availability = { kind = "file", path = "traces/avail.csv" }
'''


def sweep_file(tmp_path: Path, sweep: str, base: str = BASE) -> Path:
    (tmp_path / "traces").mkdir(exist_ok=True)
    (tmp_path / "traces" / "avail.csv").write_text(
        "device,start_s,end_s,state\nsmall-0,0,100,active\nsmall-1,0,100,active\n")
    path = tmp_path / "s.toml"
    path.write_text(base + sweep)
    return path


VARIANTS = '''
[sweep]
seeds = [3, 4]
target_accuracy = 0.5
[[sweep.variant]]
name = "semi"
[[sweep.variant]]
name = "fedavg"
strategy = { name = "fedavg", merge = "per-element" }
train = { lr = 0.05 }
fleet = { big = { profiles = ["width=0.5", "width=0.25"] } }
'''


def test_variants_override_tables_then_validate(tmp_path: Path) -> None:
    plan = load_sweep(sweep_file(tmp_path, VARIANTS))
    assert plan.seeds == (3, 4) and plan.target_accuracy == 0.5
    assert [v.name for v in plan.variants] == ["semi", "fedavg"]
    semi = variant_tables(plan, plan.variants[0], 3)
    assert semi["strategy"] == {"name": "semi-async", "k_fraction": 0.5}
    assert (semi["campaign"]["name"], semi["campaign"]["seed"]) == ("cw-semi", 3)
    fedavg = variant_tables(plan, plan.variants[1], 4)
    assert fedavg["strategy"] == {"name": "fedavg", "merge": "per-element"}  # replaced: no k_fraction left over
    assert fedavg["train"] == {"local_steps": 5, "lr": 0.05}  # merged key by key
    big, small = fedavg["fleet"]
    assert big["profiles"] == ["width=0.5", "width=0.25"] and "profile" not in big
    assert small["profile"] == "width=0.5"
    # The run's campaign file lives elsewhere: the trace path is anchored to the sweep file's folder.
    assert small["availability"]["path"] == str((tmp_path / "traces" / "avail.csv").resolve())
    assert plan.base["fleet"][0]["profile"] == "dense"  # the base is never mutated


def test_dumped_campaign_reads_back_and_loads(tmp_path: Path) -> None:
    plan = load_sweep(sweep_file(tmp_path, VARIANTS))
    tables = variant_tables(plan, plan.variants[1], 4)
    text = dump_toml(tables)
    assert tomllib.loads(text) == tables
    elsewhere = tmp_path / "out" / "configs" / "fedavg-seed4.toml"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text(text)
    c = load_campaign(elsewhere)
    assert (c.name, c.seed, c.strategy, c.lr) == ("cw-fedavg", 4, "fedavg", 0.05)
    assert c.fleet[0].profiles == ("width=0.5", "width=0.25")


@pytest.mark.parametrize("sweep, message", [
    ("", r"a sweep file needs a \[sweep\] table"),
    ("[sweep]\nseeds = [0]\n", r"\[sweep\] needs at least one \[\[sweep.variant\]\] table"),
    ("[sweep]\nseed = [0]\n[[sweep.variant]]\nname = 'a'\n", r"\[sweep\] has unknown key 'seed'"),
    ("[sweep]\nseeds = [0, 0]\n[[sweep.variant]]\nname = 'a'\n", r"\[sweep\] seeds repeats a seed: \[0, 0\]"),
    ("[sweep]\nseeds = [-1]\n[[sweep.variant]]\nname = 'a'\n", r"seeds must be a non-empty list .* got \[-1\]"),
    ("[sweep]\ntarget_accuracy = 2\n[[sweep.variant]]\nname = 'a'\n", r"target_accuracy must be in \(0, 1\], got 2"),
    ("[[sweep.variant]]\nname = 'a b'\n", r"#1 needs name = .* got 'a b'"),
    ("[[sweep.variant]]\nname = 'a'\n[[sweep.variant]]\nname = 'a'\n", r"names must be unique, got \['a', 'a'\]"),
    ("[[sweep.variant]]\nname = 'a'\nstop = { duration_board_s = 99 }\n",
     r"'a' overrides \[stop\], which every variant shares"),
    ("[[sweep.variant]]\nname = 'a'\nmodel = { name = 'cnn' }\n", r"overrides \[model\]"),
    ("[[sweep.variant]]\nname = 'a'\nstrategi = { name = 'x' }\n", r"unknown override 'strategi'"),
    ("[[sweep.variant]]\nname = 'a'\nstrategy = 'fedavg'\n", r"strategy must be a table like strategy = \{ ... \}"),
    ("[[sweep.variant]]\nname = 'a'\nfleet = { huge = { profile = 'dense' } }\n",
     r"names group 'huge', which the campaign lacks \(groups: big, small\)"),
    ("[[sweep.variant]]\nname = 'a'\nfleet = { big = { count = 9 } }\n", r"fleet.big may set profile or profiles only"),
    # Validation happens after the overrides: the campaign loader names the bad value and the variant.
    ("[sweep]\nseeds = [1]\n[[sweep.variant]]\nname = 'a'\nstrategy = { name = 'fedavgg' }\n",
     r"\[\[sweep.variant\]\] 'a', seed 1: .*\[strategy\] name must be one of .* got 'fedavgg'"),
    ("[[sweep.variant]]\nname = 'a'\nfleet = { small = { profile = 'width=7' } }\n",
     r"'a', seed 0: .*\[\[fleet\]\] 'small': .*width"),
])
def test_bad_sweep_files_fail_with_one_line_naming_the_value(tmp_path: Path, sweep: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_sweep(sweep_file(tmp_path, sweep))
    assert "\n" not in str(info.value)


def test_parse_seeds() -> None:
    assert parse_seeds("0,1,2") == (0, 1, 2)
    with pytest.raises(ConfigError, match="got 'x'"):
        parse_seeds("0,x")
    with pytest.raises(ConfigError, match="repeats"):
        parse_seeds("1,1")


def test_the_shipped_compare_width_sweep_is_valid() -> None:
    plan = load_sweep(ROOT / "campaigns" / "compare-width.toml")
    assert [v.name for v in plan.variants] == ["fedavg-smallest", "heterofl", "fedrolex", "fjord"]
    assert plan.seeds == (0, 1, 2)
    profiles = {v.name: [g.get("profile") for g in variant_tables(plan, v, 0)["fleet"]] for v in plan.variants}
    assert profiles == {"fedavg-smallest": ["width=0.25"] * 3,
                        "heterofl": ["dense", "width=0.5", "width=0.25"],
                        "fedrolex": ["dense", "width=0.5,window=rolling", "width=0.25,window=rolling"],
                        "fjord": ["dense", "p_max=0.5", "p_max=0.25"]}
    fjord = next(v for v in plan.variants if v.name == "fjord")
    assert variant_tables(plan, fjord, 0)["method"] == {"name": "fjord", "widths": [0.25, 0.5, 1.0]}
    assert "dirichlet" in plan.base["model"]["partition"] and plan.base["model"]["dataset"] == "fashion-mnist"


def fake_runner(tmp_path: Path, fail: set[tuple[str, int]]) -> Any:
    """Stands in for the campaign runner: copies a known run folder (the runs' content is tested
    in test_report*; here what matters is how the sweep calls, names and tabulates them)."""
    template = run_with(tmp_path / "template", EVENTS + EXTRA)
    calls: list[Campaign] = []

    def run(campaign: Campaign, out: Path) -> dict[str, Any]:
        calls.append(campaign)
        if (campaign.name, campaign.seed) in fail:
            raise ConfigError(f"campaign {campaign.name!r} needs 9 cores")
        shutil.copytree(template, out)
        from testbed.report import write_report

        summary = write_report(out)
        summary["wasted_device_s"] = 1.5 + campaign.seed
        (out / "summary.json").write_text(json.dumps(summary))
        return summary

    return run, calls


def test_sweep_runs_every_variant_and_seed_and_tabulates(tmp_path: Path) -> None:
    plan = load_sweep(sweep_file(tmp_path, VARIANTS))
    run, calls = fake_runner(tmp_path, fail={("cw-fedavg", 4)})
    out = tmp_path / "sweep"
    lines: list[str] = []
    records = run_sweep(plan, out, run=run, progress=lines.append)
    assert [(c.name, c.seed) for c in calls] == [("cw-semi", 3), ("cw-semi", 4), ("cw-fedavg", 3), ("cw-fedavg", 4)]
    assert [r.run_dir.relative_to(out).as_posix() for r in records] == [
        "semi/seed-3", "semi/seed-4", "fedavg/seed-3", "fedavg/seed-4"]
    assert records[3].error == "campaign 'cw-fedavg' needs 9 cores" and "error: campaign" in lines[3]
    assert (out / "configs" / "fedavg-seed4.toml").is_file()
    table = json.loads((out / "sweep.json").read_text())
    semi = table["stats"]["semi"]
    assert semi["final_accuracy"] == {"mean": 0.6, "sd": 0.0, "min": 0.6, "max": 0.6, "n": 2}
    # target 0.5 from [sweep] (the copied run's own is 0.5 too): reached at 9 s.
    assert semi["time_to_target_s"]["mean"] == 9.0 and semi["wasted_device_s"]["mean"] == 5.0
    assert semi["uplink_mb"]["mean"] == 2150 / 1e6 and semi["step_ms[g]"]["mean"] == 13.0
    md = (out / "sweep.md").read_text()
    assert "| semi | 2/2 | dense | 0.600 ± 0.000 |" in md
    assert "| fedavg | 1/2 (1 failed) | dense | 0.600 |" in md
    assert (out / "sweep_accuracy.png").stat().st_size > 5000 and "data:image/png" in (out / "sweep.html").read_text()
    # The failed run left no folder: 3 of 4 are taken.
    with pytest.raises(ConfigError, match=r"run folder \S+/semi/seed-3 exists \(3 of the sweep's runs do\)"):
        check_out(plan, out, force=False)
    check_out(plan, out, force=True)
    assert "| variant | accuracy[dense] | accuracy[width=0.5] |\n" in md
    assert "| variant | peak_rss_mb[g] | step_ms[g] | task_step_ms[g] |\n" in md
    assert semi["accuracy[width=0.5]"]["mean"] == 0.55
    rebuilt = table_from_runs(plan, out)  # nothing runs: the same table from the folders
    assert [r.error is None for r in rebuilt] == [True, True, True, False]
    assert rebuilt[3].error == f"run folder {out / 'fedavg' / 'seed-4'} does not exist"
    again = json.loads((out / "sweep.json").read_text())
    assert again["stats"]["semi"] == table["stats"]["semi"]
    assert [r["host_wall_s"] for r in again["runs"]] == [r["host_wall_s"] for r in table["runs"]]  # kept


def test_wasted_work_is_the_reports_and_na_when_a_run_does_not_record_it(tmp_path: Path) -> None:
    plan = single_plan(sweep_file(tmp_path, ""), (0,))
    run = make_run(tmp_path / "r", name="seed-0")
    from testbed.report import write_report

    summary = write_report(run)
    for recorded, cell in ((summary, "5.000"),  # the known run's device b: 2 -> 11 s, offline 4 s
                           ({k: v for k, v in summary.items() if k != "wasted_work"}, "n/a")):
        write_sweep(plan, [RunRecord("", 0, run, 1.0, recorded)], tmp_path)
        md = (tmp_path / "sweep.md").read_text().splitlines()
        header, row = md[0].split(" | "), md[2].split(" | ")
        assert row[header.index("wasted_device_s")] == cell and row[0] == "| campaign"


def test_wasted_work_is_read_from_either_layout() -> None:
    from testbed.sweep import wasted_device_s

    assert wasted_device_s({"wasted_device_s": 2.5}) == 2.5
    assert wasted_device_s({"wasted_work": {"wasted_s": 4.0, "useful_s": 9.0}}) == 4.0
    assert wasted_device_s({}) is None and wasted_device_s({"wasted_work": {"wasted_s": None}}) is None


def test_band_holds_each_seed_between_evaluations() -> None:
    band = _band([[(1.0, 0.2), (3.0, 0.6)], [(2.0, 0.4)]], end_s=4.0)
    grid = band["t_s"]

    def at(t: float, key: str) -> float:
        return band[key][min(range(len(grid)), key=lambda i: abs(grid[i] - t))]

    assert at(0.5, "mean") != at(0.5, "mean")  # NaN: nobody scored yet
    assert at(1.5, "mean") != at(1.5, "mean") and at(1.5, "max") == pytest.approx(0.2)  # one seed scored
    assert at(2.5, "mean") == pytest.approx(0.3) and (at(2.5, "min"), at(2.5, "max")) == (0.2, 0.4)
    assert at(3.5, "mean") == pytest.approx(0.5) and (at(3.5, "min"), at(3.5, "max")) == (0.4, 0.6)


@pytest.mark.parametrize("args, needle", [
    (["campaign", "sweep", "SWEEP", "--seeds", "1,a"], "--seeds wants comma-separated non-negative integers"),
    (["campaign", "sweep", "SWEEP", "--variants", "semi,nope"], "--variants: no variant 'nope'; the file has semi"),
    (["campaign", "sweep", "SWEEP", "--out", "TAKEN"], "TAKEN/semi/seed-3 exists"),
    (["campaign", "run", "SWEEP"], "is a sweep file ([sweep] table): run it with `orchard campaign sweep"),
    (["campaign", "run", "SWEEP", "--seeds", "2,2"], "a sweep file"),
    (["campaign", "sweep", "BASE"], "a sweep file needs a [sweep] table"),
])
def test_sweep_command_line_errors_are_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    from tests.unit.test_cli_train import orchard

    sweep = sweep_file(tmp_path, VARIANTS)
    base = tmp_path / "base.toml"
    base.write_text(BASE.replace("traces/avail.csv", str(tmp_path / "traces" / "avail.csv")))
    (tmp_path / "taken" / "semi" / "seed-3").mkdir(parents=True)
    subs = {"SWEEP": str(sweep), "BASE": str(base), "TAKEN": str(tmp_path / "taken")}
    proc = orchard(*[subs.get(a, a) for a in args], cache=tmp_path / "cache", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == EXIT_CONFIG and len(lines) == 1, proc.stderr  # a config error, not usage
    assert lines[0].startswith("error:") and needle.replace("TAKEN", str(tmp_path / "taken")) in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_stops_the_sweep_and_keeps_the_table_of_what_finished(tmp_path: Path) -> None:
    plan = load_sweep(sweep_file(tmp_path, VARIANTS))
    run, calls = fake_runner(tmp_path, fail=set())

    def interrupted_second(campaign: Campaign, out: Path) -> dict[str, Any]:
        if len(calls) == 1:
            calls.append(campaign)
            raise KeyboardInterrupt
        summary: dict[str, Any] = run(campaign, out)
        return summary

    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, out, run=interrupted_second, progress=lambda _: None)
    assert [(c.name, c.seed) for c in calls] == [("cw-semi", 3), ("cw-semi", 4)]  # nothing after the Ctrl-C
    table = json.loads((out / "sweep.json").read_text())
    assert [(r["variant"], r["seed"]) for r in table["runs"]] == [("semi", 3)]
