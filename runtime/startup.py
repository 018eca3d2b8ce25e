"""Start-up marks: where a device's seconds from process start to hello go.

`mark(name)` records the time since the process started (the kernel's start time of this pid,
so the interpreter's own start-up is counted too) and this process's CPU seconds. The agent logs
them as one line, `startup pid=<pid> <name>=<s> ... cpu_<name>=<s> ...`, at its hello and again
when its trainer child is ready; bench/startup_bench.py reads that line. Linux only (procfs);
elsewhere the marks count from the first mark instead.

`defer_import(name)`: a module the agent's libraries import but, on its path, never use (paho
imports urllib.request for proxies it only looks up when PySocks is installed, and ssl for TLS)
is put in sys.modules as a placeholder that imports the real module at its first attribute
access (a module `__getattr__`, PEP 562), so nothing changes for whoever does use it. Not
importlib.util.LazyLoader: on CPython < 3.12 the import statement itself reads the module's
`__spec__`, which makes a LazyLoader module load at once.

`python -S` (PYTHON_FLAGS, what every launcher of a device agent passes; `add_site_packages()`):
no `site` at start-up. In this host's venv `site` runs two .pth files (setuptools' distutils shim and
the editable install's finder, which imports pathlib, fnmatch and urllib.parse and adds a finder
that every later import consults): 29 ms of CPU for `python -c pass` against 10 ms with -S at
load 6, about 0.4 s of a Pi Zero 2 W's quota. `add_site_packages()` then puts the venv's site-packages on
sys.path as `site` would (and sets sys.prefix to the venv, as `site` does), without running .pth
files: the agent's packages (paho, psutil, numpy) need none, and `runtime` itself is found from
the working directory or PYTHONPATH. Outside a venv, or in one that includes the system's
packages, it runs `site.main()`, so nothing is lost where the short path does not apply.

`hold_gc()` / `release_gc()`: no cyclic garbage collection from the interpreter's start until the
agent is connected. Its imports allocate ~20k objects, which set off ~50 collections (~6 ms of
CPU on this host, ~0.13 s of a Pi Zero 2 W's quota) that find ~500 objects of garbage.
"""

from __future__ import annotations

import gc
import os
import sys
import time

_marks: dict[str, float] = {}
_cpu: dict[str, float] = {}
_origin: float | None = None  # time.monotonic() of process start
_gc_held = False
PYTHON_FLAGS = ("-S",)  # before `-m runtime` (module doc); the trainer child mirrors sys.flags.no_site


def _process_start_monotonic() -> float:
    """Process start on time.monotonic()'s clock: /proc/self/stat's starttime (clock ticks since
    boot) against /proc/uptime, both counted from boot (10 ms resolution)."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22; comm may hold spaces
        return time.monotonic() - (uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def mark(name: str) -> None:
    global _origin
    if _origin is None:
        _origin = _process_start_monotonic()
    if name not in _marks:  # the first time counts (a reconnect says hello again)
        _marks[name] = max(0.0, time.monotonic() - _origin)
        _cpu[name] = time.process_time()


def line() -> str:
    times = " ".join(f"{k}={v:.3f}" for k, v in _marks.items())
    cpu = " ".join(f"cpu_{k}={v:.3f}" for k, v in _cpu.items())
    return f"startup pid={os.getpid()} {times} {cpu}"


def add_site_packages() -> None:
    """What `site` would add, when the interpreter was started with -S (module doc)."""
    if not sys.flags.no_site:
        return
    exe_dir = os.path.dirname(os.path.abspath(sys.executable))
    prefix = os.path.dirname(exe_dir)
    for cfg in (os.path.join(exe_dir, "pyvenv.cfg"), os.path.join(prefix, "pyvenv.cfg")):
        if os.path.isfile(cfg):
            break
    else:
        cfg = ""
    system_too = False
    if cfg:
        with open(cfg, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip().lower() == "include-system-site-packages":
                    system_too = value.strip().lower() == "true"
    if not cfg or system_too:
        import site

        site.main()
        return
    prefix = os.path.dirname(cfg)
    sys.prefix = sys.exec_prefix = prefix
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    libdirs = [getattr(sys, "platlibdir", "lib")]  # 3.9+; "lib" on 3.8
    if libdirs[0] != "lib":
        libdirs.append("lib")
    for libdir in libdirs:
        path = os.path.join(prefix, libdir, version, "site-packages")
        if os.path.isdir(path) and path not in sys.path:
            sys.path.append(path)


def hold_gc() -> None:
    global _gc_held
    if gc.isenabled():
        gc.disable()
        _gc_held = True


def release_gc() -> None:
    """Once, after hold_gc: what start-up built stays for the process's life, so it is moved out
    of the collector's generations (gc.freeze) instead of being scanned again by every full
    collection."""
    global _gc_held
    if _gc_held:
        _gc_held = False
        gc.freeze()
        gc.enable()


def defer_import(name: str) -> None:
    """Import `name` at the first use of one of its attributes instead of now (module doc). A
    module already imported, or not found, is left alone."""
    if name in sys.modules:
        return
    import importlib.util  # here: the interpreter mark (runtime/__main__.py) counts only the interpreter
    import threading
    import types

    spec = importlib.util.find_spec(name)  # imports its parent package, if any
    if spec is None or spec.loader is None:
        return
    loader = spec.loader
    placeholder = types.ModuleType(name)
    lock = threading.Lock()

    def load(attr: str) -> object:
        with lock:
            real = sys.modules.get(name)
            if real is None or real is placeholder:
                real = importlib.util.module_from_spec(spec)
                sys.modules[name] = real
                try:
                    loader.exec_module(real)
                except BaseException:
                    sys.modules[name] = placeholder
                    raise
                if parent:
                    setattr(sys.modules[parent], child, real)
        return getattr(real, attr)

    placeholder.__dict__.update(__spec__=spec, __loader__=loader, __getattr__=load)
    parent, _, child = name.rpartition(".")
    sys.modules[name] = placeholder
    if parent:
        setattr(sys.modules[parent], child, placeholder)
