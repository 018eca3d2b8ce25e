"""ssl is deferred on the agent's path (runtime/__main__.py DEFERRED_IMPORTS, runtime/startup.py
defer_import), yet a device on mqtts:// still gets a verified TLS session: the placeholder loads the
real module when paho's tls_set first touches it. A fresh interpreter, as a board starts, against a
real mosquitto serving only TLS with the lab's CA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.broker import open_broker
from testbed.lab_secrets import provision

pytestmark = [pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys
import runtime.__main__
from runtime import startup
for name in runtime.__main__.DEFERRED_IMPORTS:
    startup.defer_import(name)
from runtime.mqtt import MqttClient, MqttConfig
before = "_ssl" in sys.modules
url, ca, user, password = sys.argv[1:5]
c = MqttClient(url, MqttConfig("deferred-tls", username=user, password=password, ca_file=ca, connect_timeout_s=5))
c.connect()
c.publish("orchard/tls/dev0/status", b"", qos=1, wait_s=5)
c.close()
print(json.dumps({"ssl_before_connect": before, "ssl_after": type(sys.modules["ssl"].SSLContext).__name__}))
"""


def test_a_deferred_ssl_still_serves_mqtts(tmp_path: Path, mosquitto_bin: str) -> None:
    lab = provision(tmp_path / "run", "orchard/tls", ["dev0"], tls=True)
    assert lab.tls is not None
    with open_broker("mosquitto", lab=lab) as broker:
        assert broker.url.startswith("mqtts://")
        out = subprocess.run([sys.executable, "-c", _PROBE, broker.url, str(lab.tls.ca_file), "dev0",
                              lab.devices["dev0"].password], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"ssl_before_connect": False, "ssl_after": "type"}
