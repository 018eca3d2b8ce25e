"""Run a hand-built ONNX graph once, on one CPU thread: the graph-rewrite tests compare ORT's
kernels with their rewrites and with numpy on the same feeds."""

from __future__ import annotations

import numpy as np
import onnx

from runtime.ort import onnxruntime


def run_graph(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = onnxruntime.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, feeds)]
