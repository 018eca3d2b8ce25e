"""The one module that touches `onnxruntime.training`.

`onnxruntime/training/__init__.py` imports its optimizers, which import torch
(microsoft/onnxruntime#22070). A board has no torch, so the package module is registered by
hand with its `__path__` and only the `api` submodule (and, on the host, `artifacts`) is loaded.
Where torch IS installed (a Jetson image, a host with the bench's reference), `import
onnxruntime` itself imports `onnxruntime.training.ortmodule` and with it torch, from
`capi/onnxruntime_validation.py` (+1.6 s and +310 MB RSS measured here): so the package is
registered before onnxruntime is first imported, and `ortmodule` (torch interop, unused) is
marked absent, which that check reads as "no ORTModule".
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.backend import LOGITS, LOSS, Feeds, Outputs
from runtime.errors import ArtifactError, TrainerError
from runtime.layout import FloatArray
from runtime.manifest import Manifest, read_manifest


def _preregister_training_package() -> None:
    if "onnxruntime" in sys.modules or "onnxruntime.training" in sys.modules:
        return
    spec = importlib.util.find_spec("onnxruntime")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        return  # the import below raises the usual error
    pkg = types.ModuleType("onnxruntime.training")
    pkg.__path__ = [os.path.join(next(iter(spec.submodule_search_locations)), "training")]
    sys.modules["onnxruntime.training"] = pkg
    sys.modules.setdefault("onnxruntime.training.ortmodule", None)  # type: ignore[arg-type]


_preregister_training_package()
import onnxruntime  # noqa: E402

_LOG_ERROR_ONLY = 3
CPU_PROVIDER = "CPUExecutionProvider"
# The training API takes a device, not a provider list: these are the providers it can drive.
_TRAINING_DEVICES = {"CUDAExecutionProvider": "cuda", CPU_PROVIDER: "cpu"}
log = logging.getLogger(__name__)
_fallbacks_logged: set[str] = set()  # one line per reason and process, not one per session


def choose_device(wanted: Sequence[str], available: Sequence[str]) -> tuple[str, str | None]:
    """The training device for the first wanted provider this ORT build has, and why the ones
    before it were passed over (None when the first one was taken)."""
    reasons: list[str] = []
    for provider in wanted:
        device = _TRAINING_DEVICES.get(provider)
        if device is None:
            reasons.append(f"{provider} cannot train (the training API drives CUDA or CPU only)")
        elif provider in available:
            return device, "; ".join(reasons) or None
        else:
            reasons.append(f"{provider} is not in this onnxruntime build (it has {', '.join(available)})")
    return "cpu", "; ".join(reasons) or None


def _log_fallback(reason: str) -> None:
    if reason not in _fallbacks_logged:
        _fallbacks_logged.add(reason)
        log.warning("execution provider: %s; training on CPU", reason)


def _register_training_package() -> None:
    onnxruntime.set_default_logger_severity(_LOG_ERROR_ONLY)
    if "onnxruntime.training" in sys.modules:
        return
    pkg = types.ModuleType("onnxruntime.training")
    pkg.__path__ = [os.path.join(os.path.dirname(onnxruntime.__file__), "training")]
    sys.modules["onnxruntime.training"] = pkg


def training_api() -> Any:
    _register_training_package()
    from onnxruntime.training import api

    return api


def training_artifacts_module() -> Any:
    """`onnxruntime.training.artifacts`, for generating artifacts on the host (needs onnx)."""
    _register_training_package()
    from onnxruntime.training import artifacts

    return artifacts


def onnxruntime_version() -> str:
    return str(onnxruntime.__version__)


class OrtSession:
    """Training and eval sessions of one artifact directory, with a flat parameter buffer."""

    def __init__(self, directory: Path | str, threads: int = 1, manifest: Manifest | None = None,
                 providers: Sequence[str] = (CPU_PROVIDER,)) -> None:
        self.directory = Path(directory)
        self.manifest = manifest if manifest is not None else read_manifest(self.directory)
        self.layout = self.manifest.layout
        api = training_api()
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Spinning threads burn CPU quota while waiting; under a cgroup that is stolen step time.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        d = self.directory
        self.device, why = choose_device(providers, onnxruntime.get_available_providers())
        try:
            try:
                self._open(api, d, opts)
            except Exception as exc:  # a CUDA wheel on a board whose GPU or driver is unusable
                if self.device == "cpu":
                    raise
                why, self.device = f"{self.device} failed on this device ({str(exc).splitlines()[0]})", "cpu"
                self._open(api, d, opts)
        except Exception as exc:  # ORT raises its own RuntimeError/Fail types
            raise ArtifactError(f"artifact directory {d}: ONNX Runtime could not load it: {exc}") from None
        if why is not None and self.device == "cpu":
            _log_fallback(why)
        n = int(self._module.get_parameters_size(True))
        if n != self.layout.total:
            raise ArtifactError(f"artifact directory {d}: ORT has {n} parameters, manifest layout {self.layout.total}")
        self._ortvalue = onnxruntime.OrtValue
        self.threads = threads
        # The graphs name their inputs (input, labels) and outputs; the first training output is
        # the loss (ORT's artifact generator puts it there), eval gives loss then the model's own.
        self._input_names = [str(n) for n in self._module.input_names()]
        self._train_outputs = [LOSS, *[str(n) for n in self._module.output_names()][1:]]
        # Eval gives loss then the model's outputs by name (`logits`, and a multi-exit model's
        # `exit<i>`); the training graph's inputs serve eval too (its loss takes the same ones).
        self._module.eval()
        self._eval_outputs = [LOSS, *([str(n) for n in self._module.output_names()][1:] or [LOGITS])]
        self._module.train()

    def _open(self, api: Any, d: Path, opts: Any) -> None:
        self._state = api.CheckpointState.load_checkpoint(str(d / "checkpoint"))
        self._module = api.Module(str(d / "training_model.onnx"), self._state, str(d / "eval_model.onnx"),
                                  device=self.device, session_options=opts)
        self._optimizer = api.Optimizer(str(d / "optimizer_model.onnx"), self._module)

    def set_params(self, flat: npt.NDArray[np.float32]) -> None:
        buf = np.ascontiguousarray(self.layout.check(flat))
        # The training API wants the C-level OrtValue, not the Python wrapper.
        self._module.copy_buffer_to_parameters(self._ortvalue.ortvalue_from_numpy(buf)._ortvalue, True)

    def get_params(self) -> FloatArray:
        return np.array(self._module.get_contiguous_parameters(True).numpy(), dtype=np.float32, copy=True)

    def param_grad(self, name: str) -> FloatArray:
        """The gradient ORT holds for parameter `name` from the last train step (kept until the next
        one: the reset is lazy). A split part reads its input probe's gradient this way."""
        grad = self._state.parameters[name].grad
        if grad is None:
            raise TrainerError(f"artifact {self.directory.name}: no gradient for {name!r} yet")
        return np.array(grad, dtype=np.float32, copy=True)

    def set_param(self, name: str, value: npt.NDArray[np.float32]) -> None:
        self._state.parameters[name] = np.ascontiguousarray(value, dtype=np.float32)

    def set_lr(self, lr: float) -> None:
        self._optimizer.set_learning_rate(float(lr))

    def _inputs(self, feeds: Feeds) -> list[Any]:
        missing = [n for n in self._input_names if n not in feeds]
        if missing:
            raise TrainerError(f"artifact {self.directory.name}: feeds lack {missing}; it takes {self._input_names}")
        return [feeds[n] for n in self._input_names]

    def train_step(self, feeds: Feeds) -> Outputs:
        """One forward/backward/update on a batch; `loss` is the batch's mean loss."""
        self._module.train()
        args = self._inputs(feeds)
        try:
            out = self._module(*args)
            self._optimizer.step()
            self._module.lazy_reset_grad()
        except Exception as exc:
            raise TrainerError(f"ORT train step failed on batch of shape {args[0].shape}: {exc}") from None
        outs = out if isinstance(out, (list, tuple)) else [out]
        return dict(zip(self._train_outputs, (np.asarray(o) for o in outs)))

    def eval_step(self, feeds: Feeds) -> Outputs:
        """`loss` and `logits` on a batch, without updating anything."""
        self._module.eval()
        args = self._inputs(feeds)
        try:
            out = self._module(*args)
        except Exception as exc:
            raise TrainerError(f"ORT eval step failed on batch of shape {args[0].shape}: {exc}") from None
        return dict(zip(self._eval_outputs, (np.asarray(o) for o in out)))
