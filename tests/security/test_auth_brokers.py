"""Attacks on the brokers themselves, as the default campaign serves them (issue 15, part 1).

For each broker the default campaign can use, the lab is provisioned exactly as the campaign
runner provisions it (testbed/prepare.py: the default campaign's device ids, TLS on mosquitto)
and the broker started with it. A hostile client then tries, and each attempt is refused:

* anonymous login, a wrong password, one device's name with another's password;
* a subscription to `#` (and to every device's topics) with a device's credentials: amqtt
  refuses the SUBACK; mosquitto 2.0.11's acl_file grants it but delivers nothing the device may
  not read, so the test asserts what reaches the subscriber, not the SUBACK;
* a device's credentials publishing on another device's hello/status/telemetry/update, and on
  the topics only the server publishes (tasks, artifacts, receipts, server/state): the server's
  own subscription never sees them, while the device's own publish gets through (control);
* on mosquitto: plain MQTT to the TLS listener, and TLS with a CA that is not the lab's.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from runtime.errors import TransportError
from runtime.mqtt import Message, MqttClient, MqttConfig
from runtime.protocol import Topics
from testbed.broker import Broker, open_broker
from testbed.campaign import load_campaign
from testbed.lab_secrets import Lab, make_tls, provision

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
BROKERS = ["amqtt", "mosquitto"]


@pytest.fixture(params=BROKERS)
def served(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    kind = request.param
    if kind == "mosquitto":
        request.getfixturevalue("mosquitto_bin")
    campaign = load_campaign(ROOT / "campaigns" / "default.toml")
    ids = [d for d, _ in campaign.devices()]
    lab = provision(tmp_path / "run", f"orchard/{campaign.name}", ids, tls=kind == "mosquitto")
    broker = open_broker(kind, lab=lab)
    broker.start()
    try:
        yield broker, lab
    finally:
        broker.close()


def client(broker: Broker, lab: Lab, user: str | None, password: str | None, ca: str = "lab",
           url: str | None = None) -> MqttClient:
    ca_file = (str(lab.tls.ca_file) if lab.tls else None) if ca == "lab" else (ca or None)
    return MqttClient(url or broker.url, MqttConfig(f"t-{uuid.uuid4().hex[:8]}", username=user, password=password,
                                                    ca_file=ca_file, connect_timeout_s=2, reconnect_max_s=2))


def refused_login(broker: Broker, lab: Lab, user: str | None, password: str | None, **kw: str) -> str:
    c = client(broker, lab, user, password, **kw)
    try:
        with pytest.raises(TransportError) as info:
            c.connect()
    finally:
        c.close()
    return str(info.value)


def messages(c: MqttClient, settle_s: float = 1.0) -> list[Message]:
    time.sleep(settle_s)
    return [e for e in c.drain() if isinstance(e, Message)]


def test_anonymous_and_wrong_credentials_cannot_connect(served: tuple[Broker, Lab]) -> None:
    broker, lab = served
    dev0, dev1 = sorted(lab.devices)[:2]
    assert "refused" in refused_login(broker, lab, None, None)  # anonymous
    assert "refused" in refused_login(broker, lab, dev0, "guess")
    assert "refused" in refused_login(broker, lab, dev0, lab.devices[dev1].password)  # another device's password
    assert "refused" in refused_login(broker, lab, "admin", "admin")
    ok = client(broker, lab, dev0, lab.devices[dev0].password)
    ok.connect()  # control: the device's own credentials work
    ok.close()


def test_a_device_cannot_read_or_write_other_devices_topics(served: tuple[Broker, Lab]) -> None:
    broker, lab = served
    t = Topics(lab.root)
    me, victim = sorted(lab.devices)[:2]
    server = client(broker, lab, lab.server.username, lab.server.password)
    attacker = client(broker, lab, me, lab.devices[me].password)
    server.connect()
    attacker.connect()
    try:
        server.subscribe(t.all_devices)
        server.subscribe(t.server_state)
        granted = []
        for pattern in ("#", f"{lab.root}/#", f"{lab.root}/dev/+/+", t.task(victim), t.update(victim)):
            try:
                attacker.subscribe(pattern)
                granted.append(pattern)
            except TransportError:
                pass
        if broker.kind == "amqtt":
            assert granted == []  # every one refused in the SUBACK
        # Impersonation: the attacker's credentials on the victim's topics and the server's.
        forged = [t.hello(victim), t.status(victim), t.telemetry(victim), t.update(victim), t.task(victim),
                  t.artifact(victim), t.receipt(victim), t.task(me), t.artifact(me), t.server_state]
        for topic in forged:
            attacker.publish(topic, b"forged", qos=1, wait_s=5)
        attacker.publish(t.update(me), b"own update", qos=1, wait_s=5)  # control
        # The server publishes on every device's topics: what reaches the attacker's subscriptions?
        for device_id in lab.devices:
            for topic in (t.task(device_id), t.artifact(device_id), t.receipt(device_id)):
                server.publish(topic, b"for " + device_id.encode(), qos=1, wait_s=5)
        seen_by_server = [(m.topic, m.payload) for m in messages(server)]
        seen_by_attacker = {m.topic for m in messages(attacker, 0.2)}
    finally:
        attacker.close()
        server.close()
    assert (t.update(me), b"own update") in seen_by_server
    assert not [m for m in seen_by_server if m[1] == b"forged"], seen_by_server
    # What got through is only what the device may read anyway: its own task/artifact/receipt.
    assert seen_by_attacker <= {t.task(me), t.artifact(me), t.receipt(me)}, seen_by_attacker
    assert not any(f"/{victim}/" in topic for topic in seen_by_attacker)


@pytest.mark.parametrize("served", ["mosquitto"], indirect=True)  # amqtt listens on loopback, plain
def test_mosquitto_serves_tls_only_with_the_labs_ca(served: tuple[Broker, Lab], tmp_path: Path) -> None:
    broker, lab = served
    assert broker.url.startswith("mqtts://")
    dev0 = sorted(lab.devices)[0]
    password = lab.devices[dev0].password
    plain = broker.url.replace("mqtts://", "mqtt://")
    refused_login(broker, lab, dev0, password, url=plain, ca="")  # plain text to the TLS listener: no session
    other = make_tls(tmp_path)  # a CA that is not the lab's: the broker's certificate fails to verify
    message = refused_login(broker, lab, dev0, password, ca=str(other.ca_file))
    assert "CERTIFICATE_VERIFY_FAILED" in message or "certificate verify failed" in message


def test_mosquitto_can_require_client_certificates(tmp_path: Path, mosquitto_bin: str) -> None:
    lab = provision(tmp_path / "run", "orchard/certs", ["dev0"], tls=True, client_certs=True)
    other = provision(tmp_path / "other", "orchard/certs", ["dev0"], tls=True, client_certs=True)
    assert lab.tls is not None and other.tls is not None
    password = lab.devices["dev0"].password
    with open_broker("mosquitto", lab=lab) as broker:

        def connect(cert: tuple[Path, Path] | None) -> None:
            files = {"cert_file": str(cert[0]), "key_file": str(cert[1])} if cert else {}
            c = MqttClient(broker.url, MqttConfig(f"t-{uuid.uuid4().hex[:8]}", username="dev0", password=password,
                                                  ca_file=str(lab.tls.ca_file), connect_timeout_s=2, **files))
            try:
                c.connect()
            finally:
                c.close()

        with pytest.raises(TransportError):
            connect(None)  # the right password, no certificate
        with pytest.raises(TransportError):
            connect(other.tls.client("dev0"))  # a certificate another lab's CA signed
        connect(lab.tls.client("dev0"))
