"""The trainer child: a long-lived process that owns ONNX Runtime and the data shard.

ONNX Runtime's training step holds the GIL for the whole step, so an MQTT client or a
telemetry sampler in the same process would stall (missed keepalives, a false Last Will,
holes in the traces). The agent therefore talks to this child over a pipe. Weights travel as
one flat float32 buffer (`send_bytes`, no pickle of arrays). If the child dies, for instance
SIGKILLed by the kernel under a memory cap, the agent sees it through `poll()` and restarts it.

Start-up (issue 16): `launch()` returns at once; the child imports ONNX Runtime and loads the
shard while the agent goes on (`ready` says when it has). It is a fresh interpreter, never a fork
of the agent: a fork would copy paho's threads and locks mid-flight, and a fresh child imports
ONNX Runtime exactly once, before any session or thread pool exists in it. It is started as
multiprocessing's "spawn" would (the agent's sys.path, a socketpair as the pipe) but with
subprocess, because spawn also starts multiprocessing's resource tracker: one more interpreter
per device (~13 MB RSS and its start-up CPU) that guards nothing here. The child runs at nice
`TRAINER_NICE`: when both want the same CPU (keepalives, telemetry, packing an update) the agent
goes first. Nice only weighs tasks against each other inside one CPU cgroup or autogroup (one per
session: a device cgroup in the testbed, the systemd service on a board), so it costs the
trainer nothing against the rest of the host; and only on one CPU's run queue: on two CPUs the
two run side by side and drain the cgroup's one quota alike (measured: launched before the
hello, the trainer took ~0.03 of a Zero 2 W's ~0.18 CPU s to it). So the agent launches it only
after its first hello (runtime/agent.py). Nothing here imports numpy
or ONNX Runtime at module level: the agent imports this module and must stay off both until its
first task (numpy) or for good (ONNX Runtime).
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing.connection as mpc
import os
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from runtime.errors import OrchardError, TrainerError
from runtime.protocol import Assignment
from runtime.record import field_table, record

if TYPE_CHECKING:
    from runtime.layout import FloatArray
    from runtime.methods.base import UpdateBody

_KEEP_SESSIONS = 2  # sessions cached beyond the running task's; each holds its model and gradient buffers


@record
class TrainJob:
    job_id: str
    artifact_root: str  # the device's artifact cache: one folder per key
    assignment: Assignment
    upload: str  # weights | delta
    steps: int
    epochs: int
    batch_size: int
    lr: float
    seed: int
    # time.monotonic() (one clock for agent and child) by which training must end for the update
    # to make the task's deadline; a method may fit its work to it (DISTREAL).
    deadline_at: float | None = None


@record
class TrainOutcome:
    job_id: str
    body: UpdateBody | None  # what the device method packed; None when training failed
    error: str | None
    failure: str | None = None  # one of runtime.protocol.FAILURES when training failed
    n_samples: int = 0
    steps: int = 0
    train_s: float = 0.0
    step_ms_median: float = 0.0
    peak_rss_mb: float = 0.0
    cpu_s: float = 0.0
    loss_first: float = float("nan")
    loss_last: float = float("nan")


class TrainerDied(TrainerError):
    """The child exited while a job was running; `exitcode` is negative for a signal."""

    def __init__(self, message: str, exitcode: int | None) -> None:
        super().__init__(message)
        self.exitcode = exitcode


def failure_of_exit(exitcode: int | None) -> str:
    """SIGKILL is what the kernel's OOM killer sends under a memory cap."""
    if exitcode in (-signal.SIGKILL, 137):
        return "oom"
    return "killed" if exitcode is not None and exitcode < 0 else "error"


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode == -signal.SIGKILL or exitcode == 137:
        return f"killed by SIGKILL (exit {exitcode}); under a memory cap this is the OOM killer"
    if exitcode < 0:
        return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


# argv: sys.path as JSON, then what _entry reads. The marker names the process in ps / top.
# Signals first: the agent's stop (SIGTERM to the process group) must not kill a child that is
# still importing, which would make a clean shutdown look like a trainer failure.
_CHILD_CODE = ("import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
               "signal.signal(signal.SIGINT, signal.SIG_IGN); "
               "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
               "from runtime.trainer_proc import _entry; _entry(sys.argv[2:])")
_MARKER = "orchard-trainer"
TRAINER_NICE = 19  # CFS weight 15 against the agent's 1024 (nice 0): the agent wins when both run


def _entry(argv: list[str]) -> None:
    marker, fd, shard_path, threads, providers = argv
    assert marker == _MARKER, marker
    with contextlib.suppress(OSError):  # raising one's own nice needs no privilege; never fatal
        os.nice(TRAINER_NICE)
    _child_main(mpc.Connection(int(fd)), shard_path, int(threads), tuple(json.loads(providers)))


class _Child:
    """A Popen with the multiprocessing.Process calls this module uses (exitcode < 0: a signal)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout_s: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout_s)

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._popen.kill()


def _child_main(conn: mpc.Connection, shard_path: str, threads: int, providers: tuple[str, ...]) -> None:
    try:
        _serve(conn, shard_path, threads, providers)
    except (BrokenPipeError, EOFError, ConnectionResetError):
        return  # the agent closed its end (shutdown, or it died): nobody is left to answer


def _serve(conn: mpc.Connection, shard_path: str, threads: int, providers: tuple[str, ...]) -> None:
    # The agent handles Ctrl-C and shutdown (SIGTERM reaches the whole process group); the child
    # must not die halfway through a reply, nor under an agent that is still sending it a job.
    # It stops when told, or when the pipe closes (the agent is gone).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import numpy as np

    from runtime.methods import device_method
    from runtime.ort import OrtSession
    from runtime.trainer import TrainConfig, Trainer

    with np.load(shard_path) as shard:
        x, y = shard["x"].astype(np.float32), shard["y"].astype(np.int64)
    sessions: OrderedDict[str, OrtSession] = OrderedDict()

    def open_backend(root: str, key: str) -> OrtSession:
        session = sessions.pop(key, None) or OrtSession(Path(root) / key, threads=threads, providers=providers)
        sessions[key] = session
        return session

    conn.send({"ready": True, "pid": os.getpid(), "n_samples": len(y)})
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg.get("op") == "stop":
            return
        job = TrainJob(**msg["job"])
        weights = np.frombuffer(conn.recv_bytes(), dtype=np.float32).copy()
        try:
            method = device_method(job.assignment, functools.partial(open_backend, job.artifact_root))
            method.deadline_at = job.deadline_at
            root = Path(job.artifact_root)
            method.state_dir = root.with_name(root.name + ".state")  # per device, next to its cache
            needed = set(job.assignment.artifact_keys)
            for old in [k for k in sessions if k not in needed][: max(0, len(sessions) - len(needed) - _KEEP_SESSIONS)]:
                del sessions[old]
            primary = sessions[job.assignment.primary_key]
            trainer = Trainer.on_backend(primary, primary.manifest.input_shape, primary.manifest.num_outputs)
            cfg = TrainConfig(steps=job.steps, epochs=job.epochs, batch_size=job.batch_size, lr=job.lr, seed=job.seed)
            r = trainer.train(weights, x, y, cfg, method=method)
            body = method.pack(weights, r.weights, job.upload)
            reply: dict[str, Any] = {
                "job_id": job.job_id, "error": None, "n_samples": r.n_samples, "steps": r.steps,
                "train_s": r.train_s, "step_ms_median": r.step_ms_median, "peak_rss_mb": r.peak_rss_mb,
                "cpu_s": r.cpu_s, "loss_first": r.loss_per_step[0], "loss_last": r.loss_per_step[-1], "form": body.form,
                "report": dict(body.report), "indices": None if body.indices is None else body.indices.tolist(),
            }
            conn.send(reply)
            conn.send_bytes(np.ascontiguousarray(body.values, dtype=np.float32).tobytes())
        except OrchardError as exc:
            conn.send({"job_id": job.job_id, "error": str(exc), "failure": "error"})
            conn.send_bytes(b"")
        except MemoryError:
            conn.send({"job_id": job.job_id, "error": "MemoryError while training", "failure": "oom"})
            conn.send_bytes(b"")


class TrainerProcess:
    """Agent-side handle: start, submit a job, poll for its outcome, restart after a death."""

    def __init__(self, shard_path: Path | str, threads: int = 1, start_timeout_s: float = 60.0,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), start: bool = True) -> None:
        self.shard_path = str(shard_path)
        self.threads = threads
        self.providers = providers  # the board's, in order; ORT falls back to CPU
        self.start_timeout_s = start_timeout_s
        self.n_samples = 0
        self.restarts = 0
        self._proc: Any = None
        self._conn: mpc.Connection | None = None
        self._job: TrainJob | None = None
        self._starting_since: float | None = None  # time.monotonic() of launch() until the child said ready
        if start:
            self.start()

    def launch(self) -> None:
        """Start the child and return at once; `ready` (or `wait_ready`) tells when it is up."""
        # A fresh interpreter, not a fork: ORT's thread pools do not survive a fork, and the agent
        # has paho threads. Same process group as the agent, so it shares its cgroup and netns.
        ours, theirs = socket.socketpair()
        # Without `site` if the agent ran without it (runtime/startup.py PYTHON_FLAGS): the child
        # gets the agent's sys.path, which already holds what `site` would add.
        flags = ["-S"] if sys.flags.no_site else []
        argv = [sys.executable, *flags, "-c", _CHILD_CODE, json.dumps(sys.path), _MARKER, str(theirs.fileno()),
                self.shard_path, str(self.threads), json.dumps(list(self.providers))]
        try:
            popen = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            raise TrainerError(f"cannot start the trainer: {exc}") from None
        finally:
            theirs.close()
        self._proc, self._conn, self._job = _Child(popen), mpc.Connection(ours.detach()), None
        self._starting_since = time.monotonic()

    def start(self) -> None:
        """Spawn the child and wait until it is ready."""
        self.launch()
        self.wait_ready(self.start_timeout_s)

    @property
    def launched(self) -> bool:
        return self._proc is not None

    @property
    def up(self) -> bool:
        """Launched and known to be ready (no polling: see `ready`)."""
        return self._proc is not None and self._starting_since is None

    @property
    def ready(self) -> bool:
        """Launched and up; raises TrainerDied if it died while starting, TrainerError if it took
        longer than start_timeout_s."""
        return self.wait_ready(0.0)

    def wait_ready(self, timeout_s: float) -> bool:
        if self._starting_since is None:
            return self._proc is not None
        assert self._conn is not None
        if not self._conn.poll(timeout_s):
            if not self._proc.is_alive():
                self._died_starting()
            if time.monotonic() - self._starting_since > self.start_timeout_s:
                self._proc.kill()
                self._proc.join(5)
                self._proc, self._conn, self._starting_since = None, None, None
                raise TrainerError(f"trainer did not start within {self.start_timeout_s:.0f} s")
            return False
        try:
            hello = self._conn.recv()
        except (EOFError, OSError):
            self._died_starting()
        self.n_samples = int(hello["n_samples"])
        self._starting_since = None
        return True

    def _died_starting(self) -> NoReturn:
        proc = self._proc
        proc.join(5)
        self._proc, self._conn, self._starting_since = None, None, None
        raise TrainerDied(f"trainer died while loading {self.shard_path}: {describe_exit(proc.exitcode)}",
                          proc.exitcode) from None

    @property
    def pid(self) -> int | None:
        return int(self._proc.pid) if self._proc is not None and self._proc.is_alive() else None

    @property
    def busy(self) -> bool:
        return self._job is not None

    def submit(self, job: TrainJob, weights: FloatArray) -> None:
        if self._job is not None:
            raise TrainerError(f"trainer is busy with job {self._job.job_id}; cannot start {job.job_id}")
        import numpy as np

        if not self.launched:
            self.launch()
        self.wait_ready(self.start_timeout_s)  # returns at once when it is up (the agent waits for `ready`)
        assert self._conn is not None
        # The job's fields as they are (the Assignment stays a record through the local, trusted pipe).
        try:
            self._conn.send({"op": "train", "job": {name: getattr(job, name) for name, _ in field_table(job)}})
            self._conn.send_bytes(np.ascontiguousarray(weights, dtype=np.float32).tobytes())
        except OSError:  # a broken pipe: the child died between jobs
            self._proc.join(5)
            code = self._proc.exitcode
            raise TrainerDied(f"trainer died before job {job.job_id}: {describe_exit(code)}", code) from None
        self._job = job

    def poll(self, timeout_s: float = 0.0) -> TrainOutcome | None:
        """The running job's outcome if it is done; raises TrainerDied if the child died."""
        if self._job is None or self._conn is None:
            return None
        job = self._job
        try:
            if not self._conn.poll(timeout_s):
                if not self._proc.is_alive():
                    raise EOFError
                return None
            reply = self._conn.recv()
            payload = self._conn.recv_bytes()
        except (EOFError, OSError):
            self._proc.join(5)
            code = self._proc.exitcode
            self._job = None
            raise TrainerDied(f"trainer died during job {job.job_id}: {describe_exit(code)}", code) from None
        self._job = None
        import numpy as np

        from runtime.methods.base import UpdateBody

        if reply.get("error"):
            return TrainOutcome(job_id=job.job_id, body=None, error=str(reply["error"]),
                                failure=str(reply.get("failure", "error")))
        values = np.frombuffer(payload, dtype=np.float32).copy()
        fields = {k: reply[k] for k in ("n_samples", "steps", "train_s", "step_ms_median", "peak_rss_mb",
                                        "cpu_s", "loss_first", "loss_last")}
        indices = None if reply["indices"] is None else np.asarray(reply["indices"], dtype=np.int64)
        body = UpdateBody(form=reply["form"], values=values, report=reply["report"], indices=indices)
        return TrainOutcome(job_id=job.job_id, body=body, error=None, **fields)

    def restart(self) -> None:
        """A fresh child, launched (not waited for): the agent's loop keeps turning while it starts."""
        self.close()
        self.restarts += 1
        self.launch()

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):  # the child may already be gone
                self._conn.send({"op": "stop"})
            self._conn.close()
        if self._proc is not None:
            self._proc.join(2)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(2)
        self._proc, self._conn, self._job, self._starting_since = None, None, None, None
