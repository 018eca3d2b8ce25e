"""Credentials files: broker login and HMAC keys, provisioned per lab (testbed/lab_secrets.py).

A device's file (in its bundle, or the run folder's secrets/<id>.toml)::

    [credentials]
    username = "dev0"
    password = "..."
    hmac_key = "64 hex digits"     # this device's key; the server holds the same one

The server's file holds its own login and every device's key::

    [credentials]
    username = "server"
    password = "..."
    [device_keys]
    dev0 = "64 hex digits"

Secrets live in files only, never on a command line or in a URL (a process list shows those to
every user). The file must be readable by its owner alone (mode 0600): one that is not is
refused, as ssh refuses a private key.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from runtime.errors import ConfigError, ProtocolError
from runtime.protocol import ID_PATTERN
from runtime.record import field, record
from runtime.seal import parse_key
from runtime.tomlconf import TomlTable, check_tables, load_toml

_CRED_KEYS = frozenset({"username", "password", "hmac_key"})


@record
class Credentials:
    username: str
    password: str = field(repr=False)
    hmac_key: bytes | None = field(default=None, repr=False)  # a device's own key
    device_keys: Mapping[str, bytes] = field(default_factory=dict, repr=False)  # the server's: every device's


def check_private(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such credentials file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read credentials: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path}: credentials file is open to other users (mode {stat.S_IMODE(mode):04o}); "
                          f"run chmod 600 {path}")


def load_credentials(path: str | Path) -> Credentials:
    p = Path(path)
    check_private(p)
    data = load_toml(p)
    check_tables(str(p), data, ("credentials", "device_keys"))
    cred = TomlTable(str(p), "credentials", data.get("credentials", {}), _CRED_KEYS)
    raw_keys = data.get("device_keys", {})
    if not isinstance(raw_keys, dict):
        raise ConfigError(f"{p}: [device_keys] must be a table of device id = hex key")
    keys: dict[str, bytes] = {}
    try:
        own = cred.optional_string("hmac_key")
        hmac_key = parse_key(own, "[credentials] hmac_key") if own is not None else None
        for device_id, text in raw_keys.items():
            if not ID_PATTERN.fullmatch(str(device_id)):
                raise ConfigError(f"{p}: [device_keys] {device_id!r} is not a device id")
            keys[str(device_id)] = parse_key(text, f"[device_keys] {device_id}")
    except ProtocolError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return Credentials(cred.string("username"), cred.string("password"), hmac_key, keys)


def write_private(path: Path, text: str) -> None:
    """Create `path` with mode 0600 from the start (no window in which others may read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(str(path), 0o600)  # O_CREAT keeps an existing file's mode
