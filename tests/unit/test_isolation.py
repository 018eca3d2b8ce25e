"""The dependency rule: runtime/ goes onto boards, so it may use numpy, onnxruntime-training,
paho-mqtt, psutil and the standard library only, and nothing from the other packages."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from models.artifacts import ensure_artifacts
from models.structure import full_structure

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_ALLOWED = {"numpy", "onnxruntime", "paho", "psutil", "runtime", "tomli"}  # tomli: Python < 3.11
# The server shares the board-safe runtime layer (schema, frames, the one paho wrapper, the TOML
# reader, ORT for evaluation) instead of keeping second copies; the device-only parts stay out.
SERVER_FORBIDDEN_RUNTIME = {"runtime.agent", "runtime.trainer_proc", "runtime.telemetry", "runtime.device_config",
                            "runtime.board", "runtime.energy", "runtime.power_sensors", "runtime.__main__"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_runtime_imports_only_board_dependencies():
    stdlib = sys.stdlib_module_names
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top in stdlib or top in RUNTIME_ALLOWED, f"{path.relative_to(ROOT)} imports {name}"


def test_method_halves_keep_to_their_package_role():
    """runtime/methods (board code) is covered by the runtime rule above; a server half never
    imports a build half or the testbed, and a build half never imports the server."""
    for path in sorted((ROOT / "models" / "methods").glob("*.py")):
        for name in _imports(path):
            assert name.split(".")[0] not in ("server", "testbed"), f"{path.relative_to(ROOT)} imports {name}"
    for path in sorted((ROOT / "server" / "methods").glob("*.py")):
        for name in _imports(path):
            assert name.split(".")[0] not in ("models", "testbed", "onnx"), f"{path.relative_to(ROOT)} imports {name}"


def test_server_imports_no_testbed_models_or_device_only_runtime():
    for path in sorted((ROOT / "server").rglob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top not in ("testbed", "models"), f"{path.relative_to(ROOT)} imports {name}"
            assert name not in SERVER_FORBIDDEN_RUNTIME, f"{path.relative_to(ROOT)} imports {name}"


BLOCKED = ["torch", "onnx", "sklearn", "scipy", "server", "testbed", "models"]

PROBE = textwrap.dedent(
    """
    import importlib.abc, json, sys
    BLOCKED = set(sys.argv[2].split(","))
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked on a board: {name}")
            return None
    sys.meta_path.insert(0, Refuse())
    import numpy as np
    import runtime.trainer, runtime.submodel, runtime.protocol, runtime.profile, runtime.ort
    from runtime.methods import METHOD_NAMES, half, spec
    for name in METHOD_NAMES:  # every device half and spec loads on a board
        half(name, "device"), spec(name).params()
    from runtime.trainer import Trainer, TrainConfig
    t = Trainer(sys.argv[1], threads=1)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 320).astype(np.int64)
    x = (rng.normal(size=(320, 1, 8, 8)) * 0.3 + y[:, None, None, None] / 10).astype(np.float32)
    r = t.train(t.session.get_params(), x, y, TrainConfig(steps=80, batch_size=32, lr=0.1))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"first": r.loss_per_step[0], "last": sum(r.loss_per_step[-10:]) / 10, "loaded": loaded}))
    """
)


def test_runtime_trains_with_only_board_packages(artifact_cache):
    directory = ensure_artifacts(full_structure("lenet", (1, 8, 8), 10), "sgd", artifact_cache).directory
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(directory), ",".join(BLOCKED)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    assert out["last"] < out["first"]
