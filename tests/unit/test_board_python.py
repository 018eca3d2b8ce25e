"""Board code stays on CPython 3.8-3.12: the 3.8 rules on the syntax tree (any interpreter), and
every runtime/ module byte-compiled under each board interpreter this host has."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.board_pythons import BOARD_VERSIONS, REQUIRE_ENV, find_python
from tests.conftest import require_or_skip
from tests.py38_rules import board_modules, violations

ROOT = Path(__file__).resolve().parents[2]


def test_board_code_keeps_the_python38_rules() -> None:
    found = [v for path in board_modules(ROOT) for v in violations(path)]
    assert not found, "\n".join(found)


def test_the_rule_checker_catches_each_kind(tmp_path: Path) -> None:
    """A test that cannot fail proves nothing: every rule fires on a line that breaks it."""
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent('''
        import tomllib
        from collections.abc import Mapping
        import functools
        Alias = int | None
        Table = Mapping[str, int]
        Pairs = list[tuple[int, int]]
        ok = isinstance(3, int | float)
        z = list(zip([1], [2], strict=True))
        name = "x".removeprefix("y")
        @functools.cache
        def f(x: int | None, y: list[int]) -> dict[str, int]: ...
        flags = re.I | re.M
    '''))
    found = violations(bad)
    assert sorted({int(v.split(":")[1]) for v in found}) == [0, 2, 5, 6, 7, 8, 9, 10, 11], found


@pytest.mark.parametrize("version", BOARD_VERSIONS)
def test_every_runtime_module_compiles_under(version: str) -> None:
    python = find_python(version)
    require_or_skip(REQUIRE_ENV, python is not None, f"no CPython {version} on this host (pyenv install {version})")
    script = ("import pathlib, sys\nbad = []\nfor p in sorted(pathlib.Path('runtime').rglob('*.py')):\n"
              "    try: compile(p.read_text(), str(p), 'exec', dont_inherit=True)\n"
              "    except SyntaxError as e: bad.append(f'{p}:{e.lineno}: {e.msg}')\nsys.exit('\\n'.join(bad) or None)")
    proc = subprocess.run([str(python), "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
