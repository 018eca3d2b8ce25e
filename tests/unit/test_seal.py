"""Sealed envelopes (runtime/seal.py), credentials files (runtime/credentials.py) and the
artifact install check (runtime/manifest.install_artifact): every refusal names its reason."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest

from models.artifacts import artifacts_for
from runtime.credentials import load_credentials, write_private
from runtime.errors import ArtifactError, ConfigError, ProtocolError
from runtime.manifest import ARTIFACT_FILES, MANIFEST, install_artifact, manifest_digest, read_manifest
from runtime.seal import MAC_BYTES, open_sealed, seal
from testbed.lab_secrets import SERVER_USER, acl_rules, provision

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
PAYLOAD = b"ORCH\x03" + os.urandom(300)


def sealed(**kw: object) -> bytes:
    args = {"key": KEY, "run_id": "runA", "device_id": "dev0", "kind": "update", **kw}
    return seal(PAYLOAD, **args)  # type: ignore[arg-type]


def refused(data: bytes, match: str, **kw: object) -> None:
    args = {"key": KEY, "run_id": "runA", "device_id": "dev0", "kind": "update", **kw}
    with pytest.raises(ProtocolError, match=match):
        open_sealed(data, **args)  # type: ignore[arg-type]


def test_round_trip_and_the_mac_is_hmac_sha256_over_everything_before_it() -> None:
    data = sealed()
    opened = open_sealed(data, key=KEY, run_id="runA", device_id="dev0", kind="update")
    assert opened.payload == PAYLOAD and (opened.run_id, opened.device_id, opened.kind) == ("runA", "dev0", "update")
    reference = hmac.new(KEY, data[:-MAC_BYTES], hashlib.sha256).digest()
    assert data[-MAC_BYTES:] == reference


def test_each_binding_is_refused_with_its_reason() -> None:
    refused(sealed(key=OTHER), "bad MAC")  # forged: another key (another device's, or made up)
    data = bytearray(sealed())
    data[40] ^= 1  # one flipped payload bit
    refused(bytes(data), "bad MAC")
    refused(sealed(run_id="runB"), r"sealed for run 'runB', this is run 'runA' \(a replay from another run\)")
    refused(sealed(device_id="dev1"), r"sealed for device 'dev1', received on dev0's topic")
    refused(sealed(kind="task"), r"sealed as a 'task' message, received as 'update'")
    refused(PAYLOAD, "not sealed")
    refused(sealed()[:20], "not sealed")
    refused(b"OSEL\x02" + sealed()[5:], "envelope version 2")
    with pytest.raises(ProtocolError, match="at least 32 bytes"):
        seal(PAYLOAD, key=b"short", run_id="r", device_id="d", kind="update")
    with pytest.raises(ProtocolError, match="kind must be one of"):
        seal(PAYLOAD, key=KEY, run_id="r", device_id="d", kind="server_state")


def test_lab_credentials_are_private_and_load(tmp_path: Path) -> None:
    lab = provision(tmp_path, "orchard/x", ["dev0", "dev1"])
    assert (lab.directory.stat().st_mode & 0o777) == 0o700
    for f in lab.directory.glob("*.toml"):
        assert (f.stat().st_mode & 0o777) == 0o600, f
    dev0 = load_credentials(lab.device_file("dev0"))
    server = load_credentials(lab.server_file)
    assert dev0.hmac_key == server.device_keys["dev0"] != server.device_keys["dev1"]
    assert dev0.password not in repr(dev0) and server.username == SERVER_USER
    os.chmod(lab.device_file("dev1"), 0o644)
    with pytest.raises(ConfigError, match=r"open to other users \(mode 0644\); run chmod 600"):
        load_credentials(lab.device_file("dev1"))
    bad = tmp_path / "bad.toml"
    write_private(bad, '[credentials]\nusername = "u"\npassword = "p"\nhmac_key = "abcd"\n')
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        load_credentials(bad)
    with pytest.raises(ConfigError, match="reserved for the server"):
        provision(tmp_path / "y", "orchard/y", [SERVER_USER])


def test_acl_rules_give_each_device_its_own_topics_only() -> None:
    rules = acl_rules("orchard/x", "srv", {"dev0": "dev0"})
    reads, writes = rules["dev0"]
    assert sorted(t.rsplit("/", 1)[-1] for t in writes) == ["hello", "status", "telemetry", "update"]
    assert sorted(t.rsplit("/", 1)[-1] for t in reads) == ["artifact", "receipt", "state", "status", "task"]
    assert all("/dev0/" in t or t == "orchard/x/server/state" for t in reads + writes)
    assert not any("#" in t or "+" in t for t in reads + writes)
    assert rules["srv"] == (["orchard/x/#"], ["orchard/x/#"])


def test_install_artifact_takes_only_the_manifest_the_task_named(tmp_path: Path, artifact_cache: Path) -> None:
    art = artifacts_for("mlp", (1, 8, 8), 10, ["dense"], cache_dir=artifact_cache)["dense"]
    files = {n: (art.directory / n).read_bytes() for n in (*ARTIFACT_FILES, MANIFEST)}
    digest = manifest_digest(read_manifest(art.directory).raw)
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(ArtifactError, match="the task asked for"):
        install_artifact(cache, art.key, files, "0" * 64)  # not the manifest the task named
    with pytest.raises(ArtifactError, match="manifest is for key"):
        install_artifact(cache, "k" + art.key[1:], files, digest)  # a real artifact under another key
    tampered = {**files, "checkpoint": files["checkpoint"][:-1] + bytes([files["checkpoint"][-1] ^ 1])}
    with pytest.raises(ArtifactError, match="corrupted"):
        install_artifact(cache, art.key, tampered, digest)
    assert list(cache.iterdir()) == []  # nothing half-written
    assert install_artifact(cache, art.key, files, digest) is True
    assert read_manifest(cache / art.key).key == art.key
    assert install_artifact(cache, art.key, files, digest) is False  # already there


def test_a_password_in_the_broker_url_is_refused_when_a_credentials_file_is_set() -> None:
    from runtime.mqtt import MqttClient, MqttConfig

    with pytest.raises(ConfigError, match="use the file"):
        MqttClient("mqtt://dev0:hunter2@127.0.0.1:1883", MqttConfig("dev0", username="dev0", password="from-file"))
    with pytest.raises(ConfigError, match="needs both cert_file and key_file"):
        MqttClient("mqtts://127.0.0.1:8883", MqttConfig("dev0", cert_file="dev0.crt"))
