"""Every registered method has its three halves, each with its own test file, and each half
exports what the registry looks up."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.methods import METHOD_NAMES, half

ROOT = Path(__file__).resolve().parents[2]
HALVES = {"device": ("runtime/methods", "Device"), "server": ("server/methods", "Server"),
          "build": ("models/methods", "build")}


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize("role", HALVES)
def test_each_half_exists_with_its_test(name: str, role: str) -> None:
    folder, export = HALVES[role]
    assert (ROOT / folder / f"{name}.py").is_file(), f"method {name!r} lacks {folder}/{name}.py"
    assert (ROOT / "tests/unit/methods" / f"test_{name}_{role}.py").is_file(), \
        f"method {name!r} lacks tests/unit/methods/test_{name}_{role}.py"
    assert hasattr(half(name, role), export), f"{folder}/{name}.py does not define {export}"


def test_no_half_without_a_registered_name() -> None:
    for folder, _ in HALVES.values():
        files = {p.stem for p in (ROOT / folder).glob("*.py") if p.stem not in ("__init__", "base")}
        assert files <= set(METHOD_NAMES), f"{folder} holds unregistered methods {files - set(METHOD_NAMES)}"
    assert hasattr(half("fjord", "device"), "SPEC")
