"""`[rounds] target_accuracy`: the server stops itself at the first evaluated version that reaches it,
so the model it leaves is that version (a stop rule outside it sees the target late, and merges
that land meanwhile replace the model that got there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.errors import ConfigError
from server.config import load_server_config

SERVER = ('[server]\nroot = "orchard/t"\nartifacts = "a.json"\neval_data = "e.npz"\n'
          'credentials = "s.toml"\nrun_id = "r1"\n[rounds]\n')


def test_target_accuracy_is_read_and_optional(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(SERVER + "target_accuracy = 0.93\n")
    assert load_server_config(path).target_accuracy == 0.93
    path.write_text(SERVER)
    assert load_server_config(path).target_accuracy is None


@pytest.mark.parametrize("value", ["0", "1.5", '"high"'])
def test_a_bad_target_accuracy_is_one_line_naming_it(tmp_path: Path, value: str) -> None:
    path = tmp_path / "server.toml"
    path.write_text(SERVER + f"target_accuracy = {value}\n")
    with pytest.raises(ConfigError) as err:
        load_server_config(path)
    assert "target_accuracy" in str(err.value) and "\n" not in str(err.value)
