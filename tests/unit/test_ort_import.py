"""Where torch is installed, `import onnxruntime` imports it through its build check
(capi/onnxruntime_validation.py imports onnxruntime.training.ortmodule). runtime/ort.py must keep
the trainer free of it: a stand-in `torch` on the path records whether anything imported it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import sys
import runtime.ort as ort
ort.training_api()
print("torch" in sys.modules, sys.modules.get("onnxruntime.training.ortmodule") is not None)
"""


def test_trainer_imports_no_torch_even_where_torch_is_importable(tmp_path: Path) -> None:
    (tmp_path / "torch.py").write_text("__version__ = '0.0-stand-in'\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    # The stand-in is importable, as a real torch would be.
    check = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], env=env,
                           capture_output=True, text=True, check=True)
    assert check.stdout.strip() == "0.0-stand-in"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]
