"""One fleet under several methods or strategies, and several seeds, for the same budget.

A sweep file is a campaign file plus a [sweep] table:

    [sweep]
    seeds = [0, 1, 2]           # every variant runs once per seed ([campaign] seed)
    target_accuracy = 0.8       # for time/energy to target in the table; runs do not stop at it

    [[sweep.variant]]
    name = "heterofl"           # no overrides: the campaign as written
    [[sweep.variant]]
    name = "fedavg-smallest"
    strategy = { name = "fedavg" }                   # replaces [strategy] (and [method]) whole
    train = { lr = 0.05 }                            # other tables merge key by key
    fleet = { pi5 = { profile = "width=0.25" } }     # per [[fleet]] group: profile or profiles

Variants are applied to the parsed TOML *before* the campaign is validated, so a variant can name
any table the campaign loader knows (a `[method]` table as soon as the loader has one), and every
variant and seed is validated before the first run starts. What makes runs comparable stays
shared: [stop] (the budget), the fleet's boards, counts and traces, [model], [broker], [throttle];
a variant that overrides them is refused.

Output: OUT/<variant>/seed-<s>/ (each an ordinary run folder with its own report),
OUT/configs/<variant>-seed<s>.toml (the exact campaign each run got), and the comparison
`sweep.md`, `sweep.csv`, `sweep.json`, `sweep_accuracy.png` and `sweep.html` (see `sweep_table`).
"""

from __future__ import annotations

import copy
import json
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError, OrchardError
from runtime.tomlconf import load_toml
from testbed.campaign import Campaign, load_campaign
from testbed.prepare import _toml_value

REPLACED = ("strategy", "method")  # a method's or strategy's parameters belong to it: never mixed
MERGED = ("train",)
OVERRIDES = (*REPLACED, *MERGED, "fleet")
FLEET_KEYS = frozenset({"profile", "profiles"})
SHARED = ("campaign", "stop", "model", "broker", "throttle")
SWEEP_KEYS = frozenset({"seeds", "target_accuracy", "variant"})
VARIANT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
# Wasted device-seconds (refused or abandoned work), when summary.json records them: a top-level
# `wasted_device_s`, or `wasted_work.wasted_s` (the energy branch's layout); "n/a" otherwise.
WASTED_KEY = "wasted_device_s"


def wasted_device_s(summary: Mapping[str, Any]) -> float | None:
    value = summary.get(WASTED_KEY)
    if value is None and isinstance(summary.get("wasted_work"), Mapping):
        value = summary["wasted_work"].get("wasted_s")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: Mapping[str, Any]


@dataclass(frozen=True)
class SweepPlan:
    source: Path
    base: Mapping[str, Any]  # the campaign tables, without [sweep]
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    target_accuracy: float | None


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); ConfigError naming the bad item."""
    seeds = []
    for item in text.split(","):
        if not item.strip().isdigit():
            raise ConfigError(f"--seeds wants comma-separated non-negative integers like 0,1,2; got {item!r}")
        seeds.append(int(item))
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds repeats a seed: {text!r}")
    return tuple(seeds)


def _seeds(file: str, value: Any) -> tuple[int, ...]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)):
        raise ConfigError(f"{file}: [sweep] seeds must be a non-empty list of non-negative integers, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{file}: [sweep] seeds repeats a seed: {value!r}")
    return tuple(value)


def load_sweep(path: str | Path, seeds: Sequence[int] | None = None) -> SweepPlan:
    """Read a sweep file; every variant x seed is validated as a campaign before this returns."""
    source = Path(path)
    file = str(source)
    data = load_toml(source)
    sweep = data.pop("sweep", None)
    if not isinstance(sweep, dict):
        raise ConfigError(f"{file}: a sweep file needs a [sweep] table with [[sweep.variant]] entries")
    unknown = sorted(set(sweep) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{file}: [sweep] has unknown key {unknown[0]!r} (expected {', '.join(sorted(SWEEP_KEYS))})")
    raw = sweep.get("variant")
    if not isinstance(raw, list) or not raw or not all(isinstance(v, dict) for v in raw):
        raise ConfigError(f"{file}: [sweep] needs at least one [[sweep.variant]] table")
    variants = tuple(_variant(file, i, v, data) for i, v in enumerate(raw))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{file}: [[sweep.variant]] names must be unique, got {names}")
    target = sweep.get("target_accuracy")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                               or not 0.0 < target <= 1.0):
        raise ConfigError(f"{file}: [sweep] target_accuracy must be in (0, 1], got {target!r}")
    plan = SweepPlan(source, data, variants, tuple(seeds) if seeds else _seeds(file, sweep.get("seeds", [0])),
                     None if target is None else float(target))
    for variant in plan.variants:
        for seed in plan.seeds:
            try:
                load_campaign(source, data=variant_tables(plan, variant, seed))
            except ConfigError as exc:
                raise ConfigError(f"[[sweep.variant]] {variant.name!r}, seed {seed}: {exc}") from None
    return plan


def single_plan(path: str | Path, seeds: Sequence[int]) -> SweepPlan:
    """`orchard campaign run FILE --seeds ...`: the campaign as written, once per seed."""
    source = Path(path)
    plan = SweepPlan(source, load_toml(source), (Variant("", {}),), tuple(seeds), None)
    for seed in plan.seeds:
        load_campaign(source, data=variant_tables(plan, plan.variants[0], seed))
    return plan


def _variant(file: str, index: int, raw: Mapping[str, Any], base: Mapping[str, Any]) -> Variant:
    name = raw.get("name")
    if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
        raise ConfigError(f"{file}: [[sweep.variant]] #{index + 1} needs name = \"...\" (letters, digits, _ . -), "
                          f"got {name!r}")
    where = f"{file}: [[sweep.variant]] {name!r}"
    overrides = {k: v for k, v in raw.items() if k != "name"}
    for key, value in overrides.items():
        if key in SHARED:
            raise ConfigError(f"{where} overrides [{key}], which every variant shares (the fleet, data and budget "
                              "must be the same to compare); move it out of the variant")
        if key not in OVERRIDES:
            raise ConfigError(f"{where}: unknown override {key!r} (expected {', '.join(OVERRIDES)})")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a table like {key} = {{ ... }}, got {value!r}")
    groups = {g.get("name") for g in base.get("fleet", []) if isinstance(g, dict)}
    for group, change in overrides.get("fleet", {}).items():
        if group not in groups:
            raise ConfigError(f"{where}: fleet override names group {group!r}, which the campaign lacks "
                              f"(groups: {', '.join(sorted(map(str, groups)))})")
        if not isinstance(change, dict) or not change or set(change) - FLEET_KEYS:
            raise ConfigError(f"{where}: fleet.{group} may set profile or profiles only, got {change!r}")
    return Variant(name, overrides)


def variant_tables(plan: SweepPlan, variant: Variant, seed: int) -> dict[str, Any]:
    """The campaign tables one run gets: the base, the variant's overrides, the seed and a name."""
    data = copy.deepcopy(dict(plan.base))
    for key, value in variant.overrides.items():
        if key in REPLACED:
            data[key] = copy.deepcopy(value)
        elif key in MERGED:
            data[key] = {**data.get(key, {}), **copy.deepcopy(value)}
    for group in data.get("fleet", []):
        change = variant.overrides.get("fleet", {}).get(group.get("name"))
        if change:
            group.pop("profile", None)
            group.pop("profiles", None)
            group.update(copy.deepcopy(change))
    campaign = data.setdefault("campaign", {})
    base_name = str(campaign.get("name", plan.source.stem))
    campaign["name"] = f"{base_name}-{variant.name}" if variant.name else base_name
    campaign["seed"] = seed
    _absolute_paths(data, plan.source.parent)
    return data


def _absolute_paths(data: dict[str, Any], base: Path) -> None:
    """The run's campaign file is written elsewhere: anchor relative data and trace paths to the
    sweep file's folder, where the loader would have looked."""
    model = data.get("model", {})
    if isinstance(model.get("data_root"), str) and not Path(model["data_root"]).is_absolute():
        model["data_root"] = str((base / model["data_root"]).resolve())
    for group in data.get("fleet", []):
        for key in ("availability", "cpu"):
            trace = group.get(key)
            if isinstance(trace, dict) and isinstance(trace.get("path"), str) and not Path(trace["path"]).is_absolute():
                trace["path"] = str((base / trace["path"]).resolve())


def dump_toml(data: Mapping[str, Any]) -> str:
    """A campaign document as TOML: tables, then arrays of tables ([[fleet]])."""
    lines = []
    for name, value in data.items():
        if isinstance(value, dict):
            lines += [f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in value.items()), ""]
    for name, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines += [f"[[{name}]]", *(f"{k} = {_toml_value(v)}" for k, v in item.items()), ""]
    return "\n".join(lines)


@dataclass
class RunRecord:
    variant: str
    seed: int
    run_dir: Path
    wall_s: float  # host wall time of the whole run, set-up and report included
    summary: dict[str, Any] | None
    error: str | None = None


def run_dir_for(out: Path, variant: Variant, seed: int) -> Path:
    return Path(out) / variant.name / f"seed-{seed}" if variant.name else Path(out) / f"seed-{seed}"


def check_out(plan: SweepPlan, out: Path, force: bool) -> None:
    """Refuse, before any run starts, a sweep that would land on earlier results."""
    taken = [d for v in plan.variants for s in plan.seeds if (d := run_dir_for(out, v, s)).exists()]
    if taken and not force:
        raise ConfigError(f"run folder {taken[0]} exists ({len(taken)} of the sweep's runs do); "
                          "pass --force to replace them, or --out another folder")


def run_sweep(plan: SweepPlan, out: Path, *, run: Callable[[Campaign, Path], dict[str, Any]],
              progress: Callable[[str], None] = print) -> list[RunRecord]:
    """Run every variant x seed in turn with `run(campaign, run_dir)` (the campaign runner), then
    write the comparison. A failed run is recorded with its error and the sweep goes on."""
    from testbed.sweep_table import write_sweep

    out = Path(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    records: list[RunRecord] = []
    for variant in plan.variants:
        for seed in plan.seeds:
            tag = f"{variant.name}-seed{seed}" if variant.name else f"seed{seed}"
            config = out / "configs" / f"{tag}.toml"
            config.write_text(dump_toml(variant_tables(plan, variant, seed)))
            run_dir = run_dir_for(out, variant, seed)
            started = time.monotonic()
            try:
                summary, error = run(load_campaign(config), run_dir), None
            except OrchardError as exc:
                summary, error = None, str(exc)
            except KeyboardInterrupt:
                write_sweep(plan, records, out)  # the table of what finished, then stop
                raise
            record = RunRecord(variant.name, seed, run_dir, round(time.monotonic() - started, 1), summary, error)
            records.append(record)
            acc = (summary or {}).get("final_accuracy")
            progress(f"sweep: {variant.name or 'campaign'} seed {seed}: "
                     + (f"error: {error}" if error else f"final_accuracy={acc}") + f"  ({record.wall_s:.0f} s)")
    write_sweep(plan, records, out)
    return records


def table_from_runs(plan: SweepPlan, out: Path) -> list[RunRecord]:
    """Rebuild the comparison from the run folders a sweep left (each report rebuilt first, like
    `orchard report`), without running anything."""
    from testbed.report import write_report
    from testbed.sweep_table import write_sweep

    try:  # keep what the runs cost when they ran
        ran = {(r["variant"], r["seed"]): float(r["host_wall_s"])
               for r in json.loads((Path(out) / "sweep.json").read_text())["runs"]}
    except (OSError, ValueError, KeyError, TypeError):
        ran = {}
    records = []
    for variant in plan.variants:
        for seed in plan.seeds:
            run_dir = run_dir_for(out, variant, seed)
            wall_s = ran.get((variant.name, seed), 0.0)
            try:
                records.append(RunRecord(variant.name, seed, run_dir, wall_s, write_report(run_dir)))
            except ConfigError as exc:
                records.append(RunRecord(variant.name, seed, run_dir, wall_s, None, str(exc)))
    write_sweep(plan, records, out)
    return records


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation, min, max and count over the values that exist."""
    have = [float(v) for v in values if v is not None]
    if not have:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(have), "sd": statistics.stdev(have) if len(have) > 1 else 0.0,
            "min": min(have), "max": max(have), "n": len(have)}


def records_json(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    return [{"variant": r.variant, "seed": r.seed, "run": str(r.run_dir), "host_wall_s": r.wall_s, "error": r.error}
            for r in records]


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")
