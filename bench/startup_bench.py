"""Device start-up (issue 16 part 4): process start to hello, what the agent imports, its RSS, and
how fast a 32-device campaign is up.

IMPORTS. Each in a fresh interpreter, `IMPORT_REPS` times, median of the child's CPU seconds
(rusage of the reaped child): `python -c pass` (`interpreter`; `interpreter_as_started`: `python
-S -c pass`, the flags every device launch uses, runtime/startup.py PYTHON_FLAGS), `import numpy`,
the agent's import path (`import runtime.agent`; `agent_as_started`: the same under `python -S`
after runtime/__main__.py has added the venv's site-packages and put in the placeholders of its
DEFERRED_IMPORTS) and the trainer child's (`runtime.trainer_proc` + `runtime.ort`). For the
agent's path also: which heavy modules it loaded (numpy, onnxruntime) and its VmRSS.

DEVICE. One real device (LeNet on digits, artifacts cached by a first start) against a real
server and mosquitto (TLS), in a cgroup holding it to a board's quota on this host (Zero 2 W,
the tightest, and Pi 4), undilated, so board seconds = wall seconds. `OTHER_BOARDS`, every other
board kind with its own quota, start on the Zero's federation, their config naming the board, in
a cgroup at their own quota: one cold and one warm start each, to the hello only (no trainer,
RSS after a task, or trainer_ready mark). `cpu_budget_s`: what a hello within HELLO_BUDGET_S may
use, HELLO_BUDGET_S x the quota. Per start: exec of `python -S -m runtime` (as every launcher
starts a device) -> the server's `device_hello` event
(`hello_s`); the device cgroup's CPU seconds by then (agent + trainer); the agent's own marks
(runtime/startup.py: seconds since process start at interpreter, imports, config, credentials,
agent_init, connected, hello and trainer_ready, and the agent's CPU seconds at each; the trainer
child starts after the hello); VmRSS of the agent, its trainer child and the whole process tree
as soon as the hello is seen and once its first update was accepted. `cold`: before the start,
the page cache of every file the agent's import path reads (this venv's packages, the runtime,
the stdlib) is dropped with posix_fadvise(DONTNEED) (pages mapped by running processes stay);
`warm`: nothing dropped. Before either, runtime/'s bytecode is made fresh (testbed/bytecode.py), as
a board's install.sh leaves it. Cold and warm starts are interleaved, `DEVICE_REPS` of each, medians
reported with the host load.

CAMPAIGN. `orchard campaign run` of 32 devices, the default campaign's board mix (3:2:2:1 Pi 4,
Pi 5, Orin Nano, Zero 2 W), mlp on digits, dilation "auto" as the runner plans it; the bench
stops it (SIGINT, a clean stop) once every device said hello. `all_hellos_wall_s` /
`all_hellos_board_s`: campaign_start -> the last first `device_hello`, wall and board seconds,
with the dilation factor and the host load.

The host is shared: CPU seconds are the robust figures, wall times move with the load
(`loadavg_1m` next to each).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.startup import PYTHON_FLAGS  # noqa: E402  (how every launcher starts a device)

OUT = Path("/tmp/bench-startup")
IMPORT_REPS = 5
DEVICE_REPS = 3
DEVICE_BOARDS = ("rpi-zero2w", "rpi4b-4gb")
# Every other board kind with its own quota (the Pi 4's 2 and 8 GB have the 4 GB's), hello only.
OTHER_BOARDS = ("rpi3b-plus", "jetson-nano", "jetson-xavier-nx", "jetson-orin-nano", "rpi5", "jetson-orin-nx",
                "jetson-agx-orin")
HELLO_BUDGET_S = 2.0  # the target, exec -> hello
HELLO_TIMEOUT_S = 120.0
CAMPAIGN_N = 32
CAMPAIGN_TIMEOUT_S = 300.0
_AS_STARTED = ("import runtime.__main__ as m, runtime.startup as s\n"
               "for n in m.DEFERRED_IMPORTS: s.defer_import(n)\nimport runtime.agent")
IMPORT_CASES: dict[str, tuple[tuple[str, ...], str]] = {  # (interpreter flags, code)
    "interpreter": ((), "pass"),
    # As a device starts: `python -S` (runtime/startup.py PYTHON_FLAGS), no site, no .pth files.
    "interpreter_as_started": (PYTHON_FLAGS, "pass"),
    "numpy": ((), "import numpy"),
    "agent": ((), "import runtime.agent"),
    # What `python -S -m runtime` loads before its config: the venv's site-packages added, paho's
    # unused imports deferred first.
    "agent_as_started": (PYTHON_FLAGS, _AS_STARTED),
    "trainer_child": ((), "import runtime.trainer_proc, runtime.ort"),
}
_PROBE = """
import sys, re
{code}
s = open('/proc/self/status').read()
print(re.search(r'VmRSS:\\s+(\\d+)', s).group(1), int('numpy' in sys.modules), int('onnxruntime' in sys.modules))
"""


def _child_cpu_s(argv: list[str]) -> tuple[float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), out


def bench_imports() -> dict[str, Any]:
    rows: dict[str, Any] = {}
    cpu: dict[str, list[float]] = {k: [] for k in IMPORT_CASES}
    probe: dict[str, str] = {}
    for _ in range(IMPORT_REPS):  # interleaved, so a burst of load hits every case alike
        for name, (flags, code) in IMPORT_CASES.items():
            spent, out = _child_cpu_s([sys.executable, *flags, "-c", _PROBE.format(code=code)])
            cpu[name].append(spent)
            probe[name] = out.strip()
    for name in IMPORT_CASES:
        rss_kb, has_np, has_ort = (int(x) for x in probe[name].split())
        rows[name] = {"cpu_ms_median": round(statistics.median(cpu[name]) * 1000, 1),
                      "cpu_ms_min": round(min(cpu[name]) * 1000, 1), "rss_mb": round(rss_kb / 1024, 1),
                      "imports_numpy": bool(has_np), "imports_onnxruntime": bool(has_ort)}
        print(f"  import {name:<14} {rows[name]['cpu_ms_median']:6.0f} ms CPU  RSS {rows[name]['rss_mb']:5.1f} MB"
              f"  numpy={has_np} onnxruntime={has_ort}", flush=True)
    return {"reps": IMPORT_REPS, "cases": rows, "loadavg_1m": round(os.getloadavg()[0], 2)}


# ------------------------------------------------------------------------------ one device
def _import_files() -> list[Path]:
    """Files the agent's import path reads: this venv's packages, the runtime and the stdlib."""
    import sysconfig

    roots = [Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["stdlib"]), ROOT / "runtime"]
    files = []
    for r in roots:
        for p in r.rglob("*"):
            if p.suffix in (".py", ".pyc", ".so") and p.is_file() and "test" not in p.parts:
                files.append(p)
    return files


def _drop_cache(files: list[Path]) -> None:
    for p in files:
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _device_rss(pid: int) -> dict[str, Any]:
    """The agent's VmRSS, its trainer child's, and the sum over the agent's whole process tree
    (multiprocessing's spawn start method adds a resource-tracker process)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(_children(p))
    trainer = [p for p in tree[1:] if "resource_tracker" not in _cmdline(p)]
    rss = [_rss_mb(p) or 0.0 for p in tree]
    return {"agent": _rss_mb(pid), "trainer": _rss_mb(trainer[0]) if trainer else None,
            "processes": len(tree), "total": round(sum(rss), 1)}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _hellos(events: Path, device: str, after_wall: float) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        for line in events.read_text().splitlines():
            with contextlib.suppress(ValueError):
                e = json.loads(line)
                if e.get("event") == "device_hello" and e.get("device") == device and e["wall_t"] >= after_wall:
                    out.append(e)
    return out


def _marks(log: Path, pid: int) -> dict[str, float]:
    """The agent's `startup marks` line (runtime/startup.py) for this pid, if it wrote one."""
    with contextlib.suppress(OSError):
        for line in reversed(log.read_text(errors="replace").splitlines()):
            if f"startup pid={pid} " in line:
                return {k: float(v) for k, v in (kv.split("=") for kv in line.split("startup ")[1].split()[1:])}
    return {}


def _one_start(run: Path, broker_url: str, group: Any, device: str, cold: bool, files: list[Path],
               config: Path | None = None, after_task: bool = True) -> dict[str, Any]:
    from testbed.bytecode import compile_runtime

    compile_runtime()  # what a board has (testbed/bytecode.py); before the cache drop, so cold stays cold
    if cold:
        _drop_cache(files)
    cfg = config or run / "configs" / f"{device}.toml"
    log_path = run / "logs" / f"{device}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cpu0 = group.stats().cpu_usage_s or 0.0
    t0 = time.time()
    with log_path.open("ab") as log:
        argv = [sys.executable, *PYTHON_FLAGS, "-m", "runtime", "--config", str(cfg), "--broker", broker_url]
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=lambda: group.add_pid(os.getpid()))
    r: dict[str, Any] = {"cold": cold}
    try:
        deadline = time.monotonic() + HELLO_TIMEOUT_S
        while not (hellos := _hellos(run / "events.jsonl", device, t0)):
            if proc.poll() is not None or time.monotonic() > deadline:
                r["error"] = f"no hello (exit {proc.poll()})"
                return r
            time.sleep(0.02)
        r["hello_s"] = round(hellos[0]["wall_t"] - t0, 3)
        r["cgroup_cpu_s_at_hello"] = round((group.stats().cpu_usage_s or 0.0) - cpu0, 3)
        r["rss_mb_at_hello"] = _device_rss(proc.pid)
        if not after_task:  # the marks line is logged once the hello is acknowledged
            deadline = time.monotonic() + 10.0
            while "hello" not in (marks := _marks(log_path, proc.pid)) and time.monotonic() < deadline:
                time.sleep(0.05)
            r["marks"] = marks
            return r
        # After a task (the server sends one right after the hello): the agent has decoded and packed.
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and '"update_accepted"' not in _tail(run / "events.jsonl", t0, device):
            time.sleep(0.2)
        r["rss_mb_after_task"] = _device_rss(proc.pid)
        r["marks"] = _marks(log_path, proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return r


def _tail(events: Path, after_wall: float, device: str) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(ln for ln in events.read_text().splitlines()
                         if f'"{device}"' in ln and json.loads(ln).get("wall_t", 0) >= after_wall)
    return ""


def bench_device() -> dict[str, Any]:
    from runtime.board import load_board
    from testbed.broker import open_broker
    from testbed.calibrate import board_quota_cores, get_host_speed
    from testbed.cgroups import DEFAULT_ROOT
    from testbed.federate import Federation, FederationSpec, prepare
    from testbed.lab_secrets import load_lab
    from testbed.throttle import detect_throttle

    host = get_host_speed()
    files = _import_files()
    results: dict[str, Any] = {"boards": {}}
    throttle = detect_throttle(DEFAULT_ROOT, run_id=f"bench-startup-{uuid.uuid4().hex[:6]}", required=True)
    try:
        for board_name in DEVICE_BOARDS:
            board = load_board(board_name)
            quota = board_quota_cores(board, host)
            run = prepare(FederationSpec(out=OUT / board_name, devices=1, boards=(board_name,), model="lenet",
                                         rounds=1000, local_steps=10, broker="mosquitto", time_limit_s=3600),
                          force=True)
            group = throttle.create(f"start-{board_name}", quota, board.memory_cap_mb)
            with open_broker("mosquitto", lab=load_lab(run)) as broker:
                fed = Federation(run, broker.url)
                try:
                    fed.start_server()
                    while not (run / "events.jsonl").exists():
                        time.sleep(0.05)
                    time.sleep(1.0)  # its retained online state is on the broker
                    _one_start(run, broker.url, group, "dev0", cold=False, files=files)  # artifacts cached now
                    starts = []
                    for i in range(2 * DEVICE_REPS):
                        starts.append(_start_row(board_name, run, broker.url, group, i % 2 == 0, files))
                    results["boards"][board_name] = _board_row(quota, starts)
                    if board_name == DEVICE_BOARDS[0]:
                        # The other kinds on this federation: the same agent path, its config naming
                        # the board (read before the hello), in a cgroup at that board's quota.
                        for other in OTHER_BOARDS:
                            results["boards"][other] = _other_board(other, host, throttle, run, broker.url, files)
                finally:
                    fed.stop_all()
            group.destroy()
    finally:
        throttle.close()
    return results


def _start_row(board_name: str, run: Path, url: str, group: Any, cold: bool, files: list[Path],
               config: Path | None = None, after_task: bool = True) -> dict[str, Any]:
    r = _one_start(run, url, group, "dev0", cold=cold, files=files, config=config, after_task=after_task)
    r["loadavg_1m"] = round(os.getloadavg()[0], 2)
    print(f"  {board_name:<16} {'cold' if r['cold'] else 'warm'} hello {r.get('hello_s', '-')} s  cgroup CPU "
          f"{r.get('cgroup_cpu_s_at_hello', '-')} s  RSS at hello {r.get('rss_mb_at_hello')} after a task "
          f"{r.get('rss_mb_after_task', '-')}  load {r['loadavg_1m']}  {r.get('error', '')}", flush=True)
    return r


def _board_row(quota: float, starts: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians by cold / warm, and the CPU the target allows: HELLO_BUDGET_S x the quota."""
    return {"quota_cores": round(quota, 4), "cpu_budget_s": round(HELLO_BUDGET_S * quota, 3), "starts": starts,
            **{k: _medians([s for s in starts if s["cold"] == (k == "cold")]) for k in ("cold", "warm")}}


def _other_board(name: str, host: Any, throttle: Any, run: Path, url: str, files: list[Path]) -> dict[str, Any]:
    from runtime.board import load_board
    from testbed.calibrate import board_quota_cores

    board = load_board(name)
    quota = board_quota_cores(board, host)
    base = (run / "configs" / "dev0.toml").read_text()
    config = run / "configs" / f"dev0-{name}.toml"
    config.write_text(re.sub(r'(?m)^board = ".*"$', f'board = "{name}"', base, count=1))
    group = throttle.create(f"start-{name}", quota, board.memory_cap_mb)
    try:
        starts = [_start_row(name, run, url, group, cold, files, config=config, after_task=False)
                  for cold in (True, False)]
    finally:
        group.destroy()
    return _board_row(quota, starts)


def _medians(starts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in ("hello_s", "cgroup_cpu_s_at_hello", "loadavg_1m"):
        vals = [s[k] for s in starts if isinstance(s.get(k), (int, float))]
        out[k] = round(statistics.median(vals), 3) if vals else None
    for when in ("rss_mb_at_hello", "rss_mb_after_task"):
        for k in ("agent", "trainer", "total", "processes"):
            vals = [s[when][k] for s in starts if isinstance(s.get(when, {}).get(k), (int, float))]
            out[f"{when}_{k}"] = round(statistics.median(vals), 1) if vals else None
    marks = [s["marks"] for s in starts if s.get("marks")]
    if marks:
        out["marks_s"] = {k: round(statistics.median(m[k] for m in marks if k in m), 3) for k in marks[0]}
    return out


# ------------------------------------------------------------------------------ 32 devices
def campaign_toml(n: int) -> str:
    mix = (("pi4", "rpi4b-4gb", 3), ("pi5", "rpi5", 2), ("orin", "jetson-orin-nano", 2), ("zero", "rpi-zero2w", 1))
    fleet = "".join(f'\n[[fleet]]\nname = "{g}"\nboard = "{b}"\ncount = {n * c // 8}\n' for g, b, c in mix)
    return f"""[campaign]
name = "startup-{n}"
seed = 0
description = "startup bench: {n} devices, the default campaign's board mix, mlp"

[stop]
rounds = 1000000
duration_board_s = 600

[model]
name = "mlp"
dataset = "digits"
partition = "iid"

[strategy]
name = "semi-async"
k_fraction = 0.5
max_staleness = 10

[train]
local_steps = 10

[broker]
kind = "mosquitto"

[throttle]
backend = "auto"
{fleet}"""


def bench_campaign(n: int = CAMPAIGN_N) -> dict[str, Any]:
    OUT.mkdir(parents=True, exist_ok=True)
    config = OUT / f"campaign-{n}.toml"
    config.write_text(campaign_toml(n))
    run = OUT / f"campaign-{n}"
    orchard = Path(sys.executable).with_name("orchard")
    r: dict[str, Any] = {"n": n, "loadavg_1m_start": round(os.getloadavg()[0], 2)}
    t0 = time.time()
    with (OUT / f"campaign-{n}.out").open("wb") as log:
        proc = subprocess.Popen([str(orchard), "campaign", "run", str(config), "--out", str(run), "--force",
                                 "--quiet"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    first: dict[str, dict[str, Any]] = {}
    start: dict[str, Any] | None = None
    try:
        deadline = time.monotonic() + CAMPAIGN_TIMEOUT_S
        while len(first) < n and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            with contextlib.suppress(OSError):
                for line in (run / "events.jsonl").read_text().splitlines():
                    with contextlib.suppress(ValueError):
                        e = json.loads(line)
                        # Until the runner replaces the folder, its events are the last run's.
                        if e.get("event") == "campaign_start" and start is None and e.get("wall_t", 0) >= t0:
                            start = e
                        if e.get("event") == "device_hello" and e.get("wall_t", 0) >= t0:
                            first.setdefault(e["device"], e)
    finally:
        r["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the runner stops cleanly and writes its report
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    r["hellos"] = len(first)
    with contextlib.suppress(OSError, ValueError, KeyError):
        r["dilation"] = json.loads((run / "fleet.json").read_text())["time_dilation"]
    if start is not None and first:
        last = max(first.values(), key=lambda e: e["wall_t"])
        r["all_hellos_wall_s"] = round(last["wall_t"] - start["wall_t"], 2)
        r["all_hellos_board_s"] = round(last["t"] - start["t"], 2)
        waits = sorted(e["wall_t"] - start["wall_t"] for e in first.values())
        r["median_hello_wall_s"] = round(statistics.median(waits), 2)
        by_board: dict[str, list[float]] = {}
        for d, e in first.items():
            by_board.setdefault(d.rsplit("-", 1)[0], []).append(e["t"] - start["t"])
        r["last_hello_board_s_by_group"] = {g: round(max(v), 2) for g, v in sorted(by_board.items())}
    print(f"  campaign N={n}: {r['hellos']}/{n} hellos; all by {r.get('all_hellos_wall_s')} s wall = "
          f"{r.get('all_hellos_board_s')} board s (dilation {r.get('dilation')}); load "
          f"{r['loadavg_1m_start']} -> {r['loadavg_1m_end']}", flush=True)
    return r


def run() -> dict[str, Any]:
    return {"imports": bench_imports(), "device": bench_device(), "campaign": bench_campaign()}


if __name__ == "__main__":
    which = sys.argv[1:] or ["imports", "device", "campaign"]
    fns = {"imports": bench_imports, "device": bench_device, "campaign": bench_campaign}
    result = {k: fns[k]() for k in which}
    print(json.dumps(result, indent=1))
