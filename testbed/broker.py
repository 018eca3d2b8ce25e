"""MQTT brokers for campaigns and tests, behind one interface.

* `AmqttBroker`: the embedded broker (amqtt, pure Python). It runs in a CHILD PROCESS
  (`python -m testbed.broker_amqtt --port N`), not in a thread of the caller. The harness process
  also runs GIL-heavy work (ONNX Runtime training holds the GIL for a whole step: a background
  thread got ~10 ticks in 0.5 s, platform.md 4.3), and a broker starved of the GIL stops
  answering PINGREQs, so every client looks dead and the broker fires false Last Wills. A child
  process also makes stop/restart a real crash-and-recover, and leaves no asyncio loop behind.
* `MosquittoBroker`: mosquitto with a generated config in a temp dir: one listener on
  127.0.0.1, no persistence, `max_packet_size` large enough for 10 MB+ frames.

Given a `Lab` (testbed/lab_secrets.py: what every campaign and federation provisions), both
serve it: anonymous access off, each user's password checked, and the lab's ACLs enforced;
mosquitto also over TLS with the lab's certificate when the lab has one (the URL is then
mqtts://). Without a lab (the transport tests only) they stay anonymous, loopback only.
* `ExternalBroker`: a URL; nothing to start or stop.

All of them: `with open_broker("amqtt") as b: b.url` ... and `stop()` / `start()` /
`restart()` on the same port. `start()` returns once the port accepts connections; `stop()`
kills the whole process group and waits for it, so nothing is left behind.

amqtt 0.12.1's quirks, and the patches for them that its child process applies, are listed in
testbed/broker_amqtt.py (the child: `python -m testbed.broker_amqtt --port N`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.errors import ConfigError, TransportError
from runtime.mqtt import parse_broker_url
from testbed.lab_secrets import Lab, amqtt_auth, broker_certificate, mosquitto_files

LOOPBACK = "127.0.0.1"
# Both brokers' cap on one MQTT packet: a frame travels in 256 KiB chunks, so 64 MiB is far above
# anything Orchard sends and far below what would let one publish exhaust a broker's memory.
MAX_PACKET_BYTES = 64 * 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_accepts(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def find_mosquitto() -> str:
    path = shutil.which("mosquitto")
    if path is None and os.path.exists("/usr/sbin/mosquitto"):  # not on PATH for non-root users
        path = "/usr/sbin/mosquitto"
    if path is None:
        raise ConfigError(
            "mosquitto is not installed (looked on PATH and in /usr/sbin): install it "
            "(apt-get install mosquitto) or use the embedded broker (amqtt) or an external URL"
        )
    return path


def _require_loopback(host: str) -> None:
    # The embedded brokers accept anonymous clients, so they must never listen beyond this host:
    # loopback, or a testbed bridge that only the testbed's network namespaces reach (testbed.netns).
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        from testbed.netns import is_testbed_address

        ok = is_testbed_address(host)
    if not ok:
        raise ConfigError(f"embedded brokers listen on loopback or a testbed bridge only (anonymous access), "
                          f"not {host!r}")


class Broker:
    """Base: a broker reachable at `url`. Use as a context manager, or start()/close()."""

    kind = "broker"

    def __init__(self, url: str) -> None:
        self.url = url

    @property
    def running(self) -> bool:
        return True

    @property
    def pid(self) -> int | None:
        """The broker's process (its own process group), None when Orchard does not run it."""
        return None

    @property
    def scratch_dir(self) -> Path | None:
        """Where a broker Orchard runs keeps its config, certificates and log."""
        return None

    def start(self) -> Broker:
        return self

    def stop(self) -> None:
        return None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url})"


class ExternalBroker(Broker):
    """A broker someone else runs. start/stop are no-ops; restart is impossible."""

    kind = "external"

    def __init__(self, url: str) -> None:
        parse_broker_url(url)  # ConfigError on a bad URL, before anything connects
        super().__init__(url)

    def restart(self) -> None:
        raise ConfigError(f"cannot restart the external broker {self.url}: Orchard does not run it")


class _ProcessBroker(Broker):
    """A broker in its own process group on 127.0.0.1:port; the port survives restarts."""

    def __init__(self, port: int | None = None, host: str = LOOPBACK, start_timeout_s: float = 10.0,
                 lab: Lab | None = None) -> None:
        _require_loopback(host)
        self.host = host
        self.port = port or free_port(host)
        self.start_timeout_s = start_timeout_s
        self.lab = lab
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        super().__init__(f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}")

    @property
    def tls(self) -> bool:
        return False

    @property
    def workdir(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"orchard-{self.kind}-")
        return Path(self._tmp.name)

    @property
    def log_path(self) -> Path:
        return self.workdir / "broker.log"

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs (for its CPU time in the benchmarks)."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def scratch_dir(self) -> Path | None:
        return self.workdir

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> Broker:
        if self.running:
            return self
        if port_accepts(self.host, self.port):
            raise TransportError(f"{self.kind} broker: {self.host}:{self.port} is taken by another process")
        cmd = self._command()
        with open(self.log_path, "ab") as log:
            # Own session = own process group, so stop() can kill it and anything it spawned.
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self._env(), start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout_s
        while not port_accepts(self.host, self.port):
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise TransportError(
                    f"{self.kind} broker on {self.url} exited with code {code} while starting: "
                    f"{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TransportError(
                    f"{self.kind} broker on {self.url} did not accept connections within "
                    f"{self.start_timeout_s:g} s: {self._log_tail()}"
                )
            time.sleep(0.05)
        return self

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace_s`, and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # The group leader may be gone while a grandchild lives on: sweep the group once more.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def kill(self) -> None:
        """Crash the broker (SIGKILL, no shutdown), as a fault test wants."""
        self.stop(grace_s=0.0)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _log_tail(self, n_chars: int = 600) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return "(no log)"
        return text[-n_chars:] if text else "(empty log)"


class AmqttBroker(_ProcessBroker):
    """The embedded broker: amqtt in a child process (why: module docstring)."""

    kind = "amqtt"

    def __init__(self, port: int | None = None, host: str = LOOPBACK, start_timeout_s: float = 10.0,
                 max_packet_bytes: int = MAX_PACKET_BYTES, lab: Lab | None = None) -> None:
        self.max_packet_bytes = max_packet_bytes
        super().__init__(port, host, start_timeout_s, lab)

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "testbed.broker_amqtt", "--host", self.host, "--port", str(self.port),
               "--max-packet-bytes", str(self.max_packet_bytes)]
        if self.lab is not None:  # a file, never the command line: it names the password file
            auth = self.workdir / "auth.json"
            auth.write_text(json.dumps(amqtt_auth(self.lab, self.workdir)))
            cmd += ["--auth", str(auth)]
        return cmd

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The child must import this package even when the caller runs from another directory.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env


class MosquittoBroker(_ProcessBroker):
    """mosquitto with a generated config; `binary` defaults to PATH or /usr/sbin/mosquitto."""

    kind = "mosquitto"

    def __init__(
        self,
        port: int | None = None,
        host: str = LOOPBACK,
        binary: str | None = None,
        max_packet_bytes: int = MAX_PACKET_BYTES,
        start_timeout_s: float = 10.0,
        lab: Lab | None = None,
    ) -> None:
        self.binary = binary or find_mosquitto()
        # 0 would mean unlimited; an explicit cap documents the budget (a 10 MB update plus
        # the frame header fits many times) and an oversize sender is disconnected, not
        # silently dropped as with message_size_limit (platform.md 4.1).
        self.max_packet_bytes = max_packet_bytes
        super().__init__(port, host, start_timeout_s, lab)

    @property
    def tls(self) -> bool:
        return self.lab is not None and self.lab.tls is not None

    def _security(self) -> list[str]:
        if self.lab is None:
            return ["allow_anonymous true"]
        passwd, acl = mosquitto_files(self.lab, self.workdir)
        lines = ["allow_anonymous false", f"password_file {passwd}", f"acl_file {acl}"]
        files = [passwd, acl]
        if self.lab.tls is not None:
            t = self.lab.tls
            ca = self.workdir / "ca.crt"
            shutil.copyfile(t.ca_file, ca)
            cert, key = broker_certificate(t, self.workdir, self.host)
            files += [ca, cert, key]
            # Client certificates are the lab's choice; a password is checked either way.
            require = "true" if t.client_certs else "false"
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}",
                      f"require_certificate {require}", "tls_version tlsv1.2"]
        _hand_to_broker_user([self.workdir, *files])
        return lines

    def config_text(self) -> str:
        return "\n".join([
            f"listener {self.port} {self.host}",
            *self._security(),
            "persistence false",
            f"max_packet_size {self.max_packet_bytes}",
            "max_inflight_messages 20",
            # The default of 1000 queued messages per client is fine; bytes are unbounded.
            "max_queued_messages 1000",
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "",
        ])

    def _command(self) -> list[str]:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        return [self.binary, "-c", str(conf)]


def _hand_to_broker_user(paths: list[Path]) -> None:
    """Started as root, mosquitto drops to the `mosquitto` user before it reads its password, ACL
    and key files: give it those files (still 0600, in a 0700 directory) rather than run as root."""
    if os.geteuid() != 0:
        return
    try:
        import pwd

        account = pwd.getpwnam("mosquitto")
    except (ImportError, KeyError):
        return  # no such user: mosquitto stays root and can read them as they are
    for path in paths:
        os.chown(path, account.pw_uid, account.pw_gid)


def open_broker(spec: str = "amqtt", port: int | None = None, host: str = LOOPBACK,
                lab: Lab | None = None) -> Broker:
    """`amqtt` (or `embedded`), `mosquitto`, or an mqtt:// / mqtts:// URL of an external broker.
    `host`: where an embedded broker listens (a testbed bridge address when devices are shaped).

    `lab`: serve its logins and ACLs (and TLS on mosquitto). An external broker's accounts are its
    operator's business; the sealed messages hold there anyway. Returns an unstarted broker;
    `with open_broker(...) as b:` starts it and cleans up."""
    if spec in ("amqtt", "embedded"):
        return AmqttBroker(port, host, lab=lab)
    if spec == "mosquitto":
        return MosquittoBroker(port, host, lab=lab)
    if "://" in spec:
        return ExternalBroker(spec)
    raise ConfigError(f"broker {spec!r}: expected 'amqtt', 'mosquitto' or an mqtt://host:port URL")
