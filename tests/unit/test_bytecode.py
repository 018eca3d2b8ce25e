"""testbed/bytecode.py: every runtime module has fresh bytecode after compile_runtime, as a
board's install.sh leaves it, even where PYTHONDONTWRITEBYTECODE stops imports from writing it."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from testbed.bytecode import RUNTIME, compile_runtime


def test_compile_runtime_leaves_a_fresh_pyc_for_every_runtime_module() -> None:
    compile_runtime()
    sources = sorted(p for p in RUNTIME.rglob("*.py") if "__pycache__" not in p.parts)
    assert len(sources) > 40
    for src in sources:
        pyc = Path(importlib.util.cache_from_source(str(src)))
        assert pyc.is_file(), src
        header = pyc.read_bytes()[:16]
        assert header[:4] == importlib.util.MAGIC_NUMBER, src
        # Timestamp-checked pyc: flags 0, then the source's mtime and size, as the import system checks.
        assert int.from_bytes(header[4:8], "little") == 0
        st = os.stat(src)
        assert int.from_bytes(header[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF, src
        assert int.from_bytes(header[12:16], "little") == st.st_size & 0xFFFFFFFF, src


def test_compile_runtime_rewrites_a_stale_pyc(tmp_path: Path) -> None:
    src = RUNTIME / "startup.py"
    pyc = Path(importlib.util.cache_from_source(str(src)))
    compile_runtime()
    pyc.write_bytes(pyc.read_bytes()[:8] + b"\0" * 8)  # a pyc of some other version of the source
    compile_runtime(sys.executable)
    assert int.from_bytes(pyc.read_bytes()[12:16], "little") == src.stat().st_size
