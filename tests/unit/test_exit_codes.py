"""Every error class has an exit code of its kind, the commands return it, and `--param`
values are TOML values."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import runtime
import server
import testbed
from runtime.errors import (
    EXIT_CODES,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_TRAINER,
    EXIT_TRANSPORT,
    ConfigError,
    OrchardError,
    TransportError,
    exit_code,
)
from runtime.tomlconf import parse_param
from runtime.trainer_proc import TrainerDied

ROOT = Path(__file__).resolve().parents[2]


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


def test_every_error_class_is_mapped() -> None:
    for package in (runtime, server, testbed):  # import everything that may define an error class
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    classes = _all_subclasses(OrchardError)
    assert len(classes) >= 10
    for cls in classes:
        code = exit_code(cls.__new__(cls))
        assert code != EXIT_FAILED, f"{cls.__module__}.{cls.__name__} has no exit code"
    assert len(set(EXIT_CODES.values())) >= 6  # kinds stay apart
    assert exit_code(TrainerDied("x", -9)) == EXIT_TRAINER and exit_code(TransportError("x")) == EXIT_TRANSPORT
    assert exit_code(OrchardError("x")) == EXIT_FAILED


def test_a_command_returns_its_error_kind(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[campaign]\nname = "x"\n[method]\nname = "fjord"\nwidths = [0.5]\n[[fleet]]\nname = "a"\n'
                   'board = "rpi4b-4gb"\n')
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "campaign", "run", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "[method] fjord: widths [0.5] must include 1.0" in lines[0]


@pytest.mark.parametrize(("item", "expected"), [
    ("server_lr=1e-3", ("server_lr", 0.001)), ("flag=true", ("flag", True)), ("k=5", ("k", 5)),
    ("merge=per-element", ("merge", "per-element")), ('name="x y"', ("name", "x y")),
    ("widths=[0.25, 1.0]", ("widths", [0.25, 1.0])), ("deadline_s=-2.5", ("deadline_s", -2.5)),
])
def test_param_values_are_toml(item: str, expected: tuple[str, object]) -> None:
    assert parse_param(item) == expected


def test_param_without_equals_names_itself() -> None:
    with pytest.raises(ConfigError, match="--param 'k' is not key=value"):
        parse_param("k")
