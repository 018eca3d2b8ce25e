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
import runtime.__main__, runtime.agent  # everything `python -m runtime` imports before the hello
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'onnxruntime', 'psutil', 'paho'))
print(json.dumps({'numpy': 'numpy' in sys.modules, 'onnxruntime': 'onnxruntime' in sys.modules}))
"""


def test_agent_import_path_has_no_onnxruntime_and_no_numpy() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == {"numpy": False, "onnxruntime": False}, loaded


def test_the_codec_path_brings_numpy_but_never_onnxruntime() -> None:
    # What the agent imports once a task arrives (frames, manifests, the trainer handle's poll).
    probe = ("import sys, runtime.agent, runtime.frames, runtime.manifest, runtime.methods.base; "
             "print(int('numpy' in sys.modules), int('onnxruntime' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "0"]


def test_agent_manifest_name_is_the_manifest_module_s() -> None:
    from runtime import agent, manifest

    assert agent.MANIFEST == manifest.MANIFEST
