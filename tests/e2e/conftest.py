"""Fixtures the end-to-end modules share."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.test_campaign import ROOT, orchard, orchard_cgroups_left, require_cgroups


@dataclass(frozen=True)
class DefaultRun:
    run: Path
    proc: subprocess.CompletedProcess[str]
    cgroups_before: frozenset[str]  # another checkout's groups of a `default` run, not ours


@pytest.fixture(scope="session")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> DefaultRun:
    """`make campaign`'s run, done once: the tests that read its folder (contents, energy, wasted
    work) only read it, and each run costs ~20 s of the suite's 15 minutes."""
    require_cgroups()
    before = frozenset(orchard_cgroups_left("default"))
    run = tmp_path_factory.mktemp("default-campaign") / "default"
    proc = orchard("campaign", "run", str(ROOT / "campaigns" / "default.toml"), "--out", str(run), "--quiet")
    return DefaultRun(run, proc, before)
