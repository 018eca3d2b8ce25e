"""A lab's secrets: broker logins, per-device HMAC keys, ACL rules, and a CA for TLS.

`provision(run, root, device_ids, tls=...)` writes `<run>/secrets/` (mode 0700, files 0600):

    server.toml          the server's broker login and every device's HMAC key
    <device>.toml        one device's login and its own key (runtime/credentials.py reads both)
    lab.json             run id, topic root, user names (no secrets): what a broker needs to know
    ca.crt               the lab's CA (devices verify the broker with it); ca.key stays here and
                         signs mosquitto's certificate when it starts, for the address it listens on
    <device>.crt/.key    with `client_certs`: each device's client certificate (CN = its id), and
                         mosquitto then requires one from every client

Every campaign and `orchard federate` run provisions its own; `load_lab(run)` reads them back for
the broker, which hashes the passwords into its own files (mosquitto's PBKDF2-SHA512 `$7$`,
amqtt's Argon2) in its private work directory. Nothing secret goes on a command line: openssl
makes keys without passphrases and is given only file names.

ACL rules (`acl_rules`) are data, rendered once per broker: a device may publish only its own
hello, status, telemetry and update, and read only its own task, artifact, receipt and status
and `server/state`; the server reads and writes the whole root. Nobody may subscribe to `#`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import secrets
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from runtime.credentials import Credentials, load_credentials, write_private
from runtime.errors import ConfigError
from runtime.protocol import ID_PATTERN, Topics

SECRETS_DIR = "secrets"
SERVER_USER = "orchard-server"  # not a valid device id (ID_PATTERN allows it, so ids are checked against it)
CA_DAYS = 3650
CERT_DAYS = 825


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    ca_key: Path  # stays in the lab's secrets: the broker's certificate is signed at its start
    client_certs: bool = False  # the broker requires a certificate signed by ca_file from every client

    def client(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of one client: a device id or the server's user."""
        return self.ca_file.parent / f"{name}.crt", self.ca_file.parent / f"{name}.key"


@dataclass(frozen=True)
class Lab:
    """What a broker, the server and the devices of one run need to authenticate each other."""

    run_id: str
    root: str
    directory: Path
    server: Credentials
    devices: Mapping[str, Credentials]
    tls: TlsFiles | None = None

    def device_file(self, device_id: str) -> Path:
        return self.directory / f"{device_id}.toml"

    @property
    def server_file(self) -> Path:
        return self.directory / "server.toml"

    def users(self) -> dict[str, str]:
        """Broker user -> password."""
        return {self.server.username: self.server.password,
                **{c.username: c.password for c in self.devices.values()}}

    def acl(self) -> dict[str, tuple[list[str], list[str]]]:
        return acl_rules(self.root, self.server.username, {d: c.username for d, c in self.devices.items()})


def new_run_id() -> str:
    return secrets.token_hex(8)


def acl_rules(root: str, server_user: str, device_users: Mapping[str, str]) -> dict[str, tuple[list[str], list[str]]]:
    """user -> (topics it may read/subscribe, topics it may publish). Literal topics only, so
    a subscription to `#` or `dev/+/+` by a device matches nothing it is allowed."""
    t = Topics(root)
    rules = {server_user: ([f"{root}/#"], [f"{root}/#"])}
    for device_id, user in device_users.items():
        reads = [t.task(device_id), t.artifact(device_id), t.receipt(device_id), t.status(device_id),
                 t.server_state]
        writes = [t.hello(device_id), t.status(device_id), t.telemetry(device_id), t.update(device_id)]
        rules[user] = (reads, writes)
    return rules


def _check_ids(device_ids: Iterable[str]) -> list[str]:
    ids = list(device_ids)
    for d in ids:
        if not ID_PATTERN.fullmatch(d):
            raise ConfigError(f"device id {d!r} must match {ID_PATTERN.pattern}")
        if d == SERVER_USER:
            raise ConfigError(f"device id {d!r} is reserved for the server's broker login")
    if len(set(ids)) != len(ids):
        raise ConfigError("device ids must be unique")
    return ids


def provision(run: Path, root: str, device_ids: Iterable[str], *, tls: bool = False,
              client_certs: bool = False, run_id: str | None = None) -> Lab:
    """Generate and write a lab's secrets under `run`/secrets; returns them."""
    ids = _check_ids(device_ids)
    directory = run / SECRETS_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    rid = run_id or new_run_id()
    keys = {d: secrets.token_bytes(32) for d in ids}
    server = Credentials(SERVER_USER, secrets.token_urlsafe(24), None, keys)
    write_private(directory / "server.toml", "\n".join([
        "[credentials]", f'username = "{server.username}"', f'password = "{server.password}"', "",
        "[device_keys]", *(f'{d} = "{k.hex()}"' for d, k in keys.items()), ""]))
    devices = {}
    for d in ids:
        cred = Credentials(d, secrets.token_urlsafe(24), keys[d])
        assert cred.hmac_key is not None
        write_private(directory / f"{d}.toml", "\n".join([
            "[credentials]", f'username = "{cred.username}"', f'password = "{cred.password}"',
            f'hmac_key = "{cred.hmac_key.hex()}"', ""]))
        devices[d] = cred
    if client_certs and not tls:
        raise ConfigError("client certificates need TLS")
    files = make_tls(directory, (SERVER_USER, *ids) if client_certs else ()) if tls else None
    (directory / "lab.json").write_text(json.dumps({"run_id": rid, "root": root, "devices": ids,
                                                    "tls": files is not None, "client_certs": client_certs},
                                                   indent=1) + "\n")
    return Lab(rid, root, directory, server, devices, files)


def load_lab(run: Path) -> Lab:
    directory = run / SECRETS_DIR
    try:
        meta = json.loads((directory / "lab.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{directory}: no lab secrets ({exc}); the run folder was not provisioned") from None
    server = load_credentials(directory / "server.toml")
    devices = {d: load_credentials(directory / f"{d}.toml") for d in meta["devices"]}
    tls = _tls_files(directory, bool(meta.get("client_certs"))) if meta.get("tls") else None
    return Lab(meta["run_id"], meta["root"], directory, server, devices, tls)


# ---------------------------------------------------------------- broker files
def mosquitto_hash(password: str, iterations: int = 101) -> str:
    """mosquitto 2's `$7$` password hash: PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte digest,
    as `mosquitto_passwd` writes it (computed here so no password reaches a command line)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_files(lab: Lab, directory: Path) -> tuple[Path, Path]:
    """Write mosquitto's password and ACL files into `directory`; returns their paths."""
    passwd, acl = directory / "passwd", directory / "acl"
    write_private(passwd, "".join(f"{u}:{mosquitto_hash(p)}\n" for u, p in lab.users().items()))
    lines = []
    for user, (reads, writes) in lab.acl().items():
        lines.append(f"user {user}")
        for topic in dict.fromkeys([*reads, *writes]):
            mode = "readwrite" if topic in reads and topic in writes else ("read" if topic in reads else "write")
            lines.append(f"topic {mode} {topic}")
        lines.append("")
    write_private(acl, "\n".join(lines))
    return passwd, acl


def amqtt_auth(lab: Lab, directory: Path) -> dict[str, object]:
    """amqtt's plugin section: its FileAuthPlugin (Argon2 hashes) and TopicAccessControlListPlugin."""
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    # Cheap parameters on purpose: the passwords are 24 random URL-safe bytes (192 bits), so the
    # hash's work factor adds nothing against guessing, while amqtt verifies on its event loop
    # (pwdlib's defaults, 64 MiB x 3 passes, stalled every client for ~0.1 s per login).
    hasher = PasswordHash((Argon2Hasher(time_cost=1, memory_cost=8192, parallelism=1),))
    passwd = directory / "passwd"
    write_private(passwd, "".join(f"{u}:{hasher.hash(p)}\n" for u, p in lab.users().items()))
    rules = lab.acl()
    return {
        "amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(passwd)},
        "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {
            "acl": {u: reads for u, (reads, _) in rules.items()},
            "publish_acl": {u: writes for u, (_, writes) in rules.items()},
        },
    }


# ---------------------------------------------------------------- TLS
_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _tls_files(directory: Path, client_certs: bool = False) -> TlsFiles:
    return TlsFiles(directory / "ca.crt", directory / "ca.key", client_certs)


def _openssl(*args: str) -> None:
    try:
        subprocess.run(["openssl", *args], check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ConfigError("TLS needs the openssl command (apt-get install openssl)") from None
    except subprocess.CalledProcessError as exc:
        raise ConfigError(f"openssl {args[0]} failed: {exc.stderr.strip()[-300:]}") from None


def _sign(tls: TlsFiles, cert: Path, key: Path, subject: str, extensions: str) -> None:
    """A new EC key and a certificate for it that the lab's CA signs (key 0600)."""
    with tempfile.TemporaryDirectory(dir=cert.parent) as tmp:
        csr, ext = Path(tmp) / "req.csr", Path(tmp) / "ext.cnf"
        ext.write_text(extensions + "basicConstraints=CA:FALSE\n")
        _openssl("req", *_EC, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={subject}")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(tls.ca_file), "-CAkey", str(tls.ca_key),
                 "-CAcreateserial", "-CAserial", str(Path(tmp) / "ca.srl"), "-out", str(cert),
                 "-days", str(CERT_DAYS), "-extfile", str(ext))
    os.chmod(key, 0o600)


def make_tls(directory: Path, clients: tuple[str, ...] = ()) -> TlsFiles:
    """The lab's CA (EC P-256, no passphrase, key 0600) and a client certificate per name in `clients`."""
    files = _tls_files(directory, bool(clients))
    _openssl("req", "-x509", *_EC, "-keyout", str(files.ca_key), "-out", str(files.ca_file), "-days", str(CA_DAYS),
             "-subj", "/CN=orchard lab CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    os.chmod(files.ca_key, 0o600)
    for name in clients:
        cert, key = files.client(name)
        _sign(files, cert, key, name, "extendedKeyUsage=clientAuth\n")
    return files


def broker_certificate(tls: TlsFiles, directory: Path, host: str) -> tuple[Path, Path]:
    """(certificate, key) for a broker listening on `host`, signed by the lab's CA when the broker
    starts: the address is known only then (a testbed bridge when devices are shaped)."""
    names = dict.fromkeys((host, "127.0.0.1", "localhost"))
    san = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in names)
    cert, key = directory / "broker.crt", directory / "broker.key"
    _sign(tls, cert, key, host, f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
    return cert, key


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
