"""What the device agent imports before its first task (issue 16 part 4): never ONNX Runtime
(the trainer child owns it), and no numpy until a task or artifact arrives. Run in a fresh
interpreter, as a board starts it (`python -m runtime`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys
import runtime.__main__
from runtime import startup
for name in runtime.__main__.DEFERRED_IMPORTS:  # as main() does, first
    startup.defer_import(name)
import runtime.agent  # everything `python -m runtime` imports before the hello
from runtime.device_config import load_device_config
for path in sys.argv[1:]:  # the config check canonicalises profiles through the method's spec
    load_device_config(path, None)
print(json.dumps({m: m in sys.modules for m in sys.argv[0].split(',')}))
"""


def test_agent_import_path_has_no_onnxruntime_and_no_numpy(tmp_path: Path) -> None:
    configs = []
    for i, profile in enumerate(("dense", "width=0.5", "classes=0-4")):
        path = tmp_path / f"dev{i}.toml"
        path.write_text(f'[device]\nid = "dev{i}"\nboard = "rpi-zero2w"\nshard = "s.npz"\nartifact_cache = "c"\n'
                        f'profiles = ["{profile}"]\n\n[broker]\nurl = "mqtt://127.0.0.1:1883"\n'
                        f'root = "orchard/t"\ncredentials = "d.toml"\nrun_id = "r1"\n')
        configs.append(str(path))
    loaded = _loaded_before_hello(configs, ("numpy", "onnxruntime"))
    assert loaded == {"numpy": False, "onnxruntime": False}, loaded


# Started by Agent._start_services once the first hello is out (runtime/agent.py's doc): on a Zero
# 2 W each 10 ms of CPU before the hello is 0.2 s of it.
AFTER_HELLO = ("psutil", "runtime.telemetry", "runtime.energy", "runtime.trainer_proc", "runtime.outbox",
               "runtime.chunks", "multiprocessing",
               # behind the placeholders of runtime/__main__.py's DEFERRED_IMPORTS: never, on this path
               "http.client", "email", "tempfile", "_ssl", "linecache", "tokenize",
               # every value class on the path is a runtime/record.py record, not a dataclass
               "dataclasses", "inspect", "ast")


def test_agent_import_path_leaves_what_the_hello_does_not_need_for_later(tmp_path: Path) -> None:
    path = tmp_path / "dev.toml"
    path.write_text('[device]\nid = "dev0"\nboard = "rpi-zero2w"\nshard = "s.npz"\nartifact_cache = "c"\n'
                    'offline = "powered-off"\n\n[broker]\nurl = "mqtt://127.0.0.1:1883"\nroot = "orchard/t"\n'
                    'credentials = "d.toml"\nrun_id = "r1"\n')
    loaded = _loaded_before_hello([str(path)], AFTER_HELLO)
    assert not any(loaded.values()), loaded
    # ...and what the sampler checks a config against is the config's own constant.
    from runtime import device_config, telemetry

    assert telemetry.OFFLINE_MODES is device_config.OFFLINE_MODES


def _loaded_before_hello(configs: list[str], modules: tuple[str, ...]) -> dict[str, bool]:
    # sys.argv[0] of `python -c` is "-c"; the probe reads the module list from it instead.
    probe = _PROBE.replace("sys.argv[0]", repr(",".join(modules)))
    out = subprocess.run([sys.executable, "-c", probe, *configs], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_codec_path_brings_numpy_but_never_onnxruntime() -> None:
    # What the agent imports once a task arrives (frames, manifests, the trainer handle's poll).
    probe = ("import sys, runtime.agent, runtime.frames, runtime.manifest, runtime.methods.base; "
             "print(int('numpy' in sys.modules), int('onnxruntime' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "0"]


def test_agent_manifest_name_is_the_manifest_module_s() -> None:
    from runtime import agent, manifest

    assert agent.MANIFEST == manifest.MANIFEST


_DEFER_PROBE = """
import sys
from runtime import startup
startup.defer_import("urllib.request")
import urllib.request  # binds the placeholder; runs nothing of the module
assert "http.client" not in sys.modules, "urllib.request ran at import"
placeholder = urllib.request
proxies = urllib.request.getproxies()  # first use: the real module, in sys.modules and on urllib
assert isinstance(proxies, dict) and "http.client" in sys.modules
real = sys.modules["urllib.request"]
assert real is not placeholder and urllib.request is real and real.getproxies is placeholder.getproxies
from urllib.request import Request  # a from-import of the placeholder's name works too
assert Request is real.Request
import os
startup.defer_import("os")  # already imported: left alone
assert sys.modules["os"] is os
startup.defer_import("no_such_module_here")
assert "no_such_module_here" not in sys.modules
print("ok")
"""


def test_a_deferred_import_runs_at_its_first_use_and_is_then_the_real_module() -> None:
    out = subprocess.run([sys.executable, "-c", _DEFER_PROBE], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


_SITE_PROBE = """
import sys
import runtime.__main__  # adds what `site` would (runtime/startup.py add_site_packages)
import paho.mqtt.client  # from the venv's site-packages
print(int("site" in sys.modules), int(any("__editable__" in m for m in sys.modules)), sys.prefix)
"""


def test_a_device_started_without_site_still_finds_the_venv_s_packages() -> None:
    from runtime.startup import PYTHON_FLAGS

    assert sys.prefix != sys.base_prefix, "the tests run in a venv (make setup)"
    out = subprocess.run([sys.executable, *PYTHON_FLAGS, "-c", _SITE_PROBE], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    # No site, no .pth files run, and sys.prefix is the venv's, as `site` would have set it.
    assert out.stdout.split() == ["0", "0", sys.prefix], out.stdout


def test_without_a_venv_the_site_less_start_runs_site_itself() -> None:
    # The interpreter the venv was made from, started with -S: no pyvenv.cfg next to it, so
    # add_site_packages falls back to site.main() and the result is what `site` would give.
    base = Path(sys.base_prefix) / "bin" / Path(sys.executable).name
    probe = "import sys, runtime.__main__; print(int('site' in sys.modules))"
    out = subprocess.run([str(base), "-S", "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["1"], out.stderr
