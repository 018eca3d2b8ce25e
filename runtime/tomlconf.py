"""Strict TOML tables: every config (board, device, server, campaign) is read through this.

Unknown keys are rejected up front, so a typo ('cors') is reported as itself and not as a
missing 'cores'; every value's type and range is checked; errors name the file, the table and
the key, in one line.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib as tomllib  # re-exported: runtime.board reads board files with it
else:  # boards on Python 3.8-3.10 (JetPack 5 and 6): the same parser, from PyPI
    import tomli as tomllib

from runtime.errors import ConfigError

MISSING: Any = object()


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None


class TomlTable:
    """Reads one TOML table: rejects unknown keys up front, then checks each value's type and range."""

    def __init__(self, file: str, table: str, data: Mapping[str, Any], allowed: frozenset[str]) -> None:
        self.file, self.table, self.data = file, table, data
        if not isinstance(data, Mapping):
            raise self.fail(f"[{table}] must be a table, got {type(data).__name__}")
        for key in data:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.fail(f"unknown key '{key}' in [{table}] (known keys: {known})")

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.file}: {message}")

    def _get(self, key: str, default: Any) -> Any:
        if key in self.data:
            return self.data[key]
        if default is MISSING:
            raise self.fail(f"missing key '{key}' in [{self.table}]")
        return default

    def _bad_type(self, key: str, want: str, value: Any) -> ConfigError:
        return self.fail(f"[{self.table}] {key} must be {want}, got {value!r} ({type(value).__name__})")

    def integer(self, key: str, lo: int, hi: int, default: Any = MISSING) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):  # TOML true is not a count
            raise self._bad_type(key, "an integer", value)
        if not lo <= value <= hi:
            raise self.fail(f"[{self.table}] {key} must be in [{lo}, {hi}], got {value}")
        return value

    def number(self, key: str, lo: float, hi: float, default: Any = MISSING, lo_open: bool = False) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad_type(key, "a number", value)
        number = float(value)
        too_low = number <= lo if lo_open else number < lo
        if not math.isfinite(number) or too_low or number > hi:
            bracket = "(" if lo_open else "["
            raise self.fail(f"[{self.table}] {key} must be in {bracket}{lo}, {hi}], got {value}")
        return number

    def optional_number(self, key: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
        return None if key not in self.data else self.number(key, lo, hi, lo_open=lo_open)

    def string(self, key: str, choices: tuple[str, ...] | None = None, default: Any = MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or not value.strip():
            raise self._bad_type(key, "a non-empty string", value)
        if choices is not None and value not in choices:
            raise self.fail(f"[{self.table}] {key} must be one of {', '.join(choices)}; got {value!r}")
        return value

    def optional_string(self, key: str) -> str | None:
        return None if key not in self.data else self.string(key)

    def boolean(self, key: str, default: Any = MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._bad_type(key, "true or false", value)
        return value

    def strings(self, key: str, default: Any = MISSING, allow_empty: bool = False) -> tuple[str, ...]:
        value = self._get(key, default)
        if isinstance(value, tuple):  # a default, already checked
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self._bad_type(key, "a list of non-empty strings", value)
        if not value and not allow_empty:
            raise self.fail(f"[{self.table}] {key} must not be empty")
        return tuple(value)


def check_tables(file: str, data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """Reject unknown top-level tables or keys of a document."""
    for key, value in data.items():
        if key not in allowed:
            where = "table" if isinstance(value, dict) else "top-level key"
            expected = ", ".join(f"[{a}]" for a in allowed)
            raise ConfigError(f"{file}: unknown {where} '{key}' (expected {expected})")


def parse_param(item: str, flag: str = "--param") -> tuple[str, Any]:
    """`key=value` from the command line, the value read as a TOML value (so `1e-3`, `true`,
    `5`, `"text"` and `[0.25, 0.5]` are typed as in a campaign file); a value TOML cannot read
    (`per-element`) is taken as the bare string it is."""
    key, sep, text = item.partition("=")
    key, text = key.strip(), text.strip()
    if not sep or not key:
        raise ConfigError(f"{flag} {item!r} is not key=value")
    try:
        return key, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return key, text
