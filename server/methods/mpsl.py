"""`mpsl`, server half (methods.md §4.4): the aggregator FedAvgs the owners' M_1 and M_P (sample
weighted), and the global model is M_1 | the compute nodes' averaged middle parts | M_P, laid
out in the full model's order (each node FedAvgs its own per-owner copies; runtime.compute_node).
The default assign hands each owner the whole model's coordinates of its two parts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime.errors import RoundError
from runtime.split import fedavg
from server.aggregate import FloatArray
from server.methods.base import ServerMethod


def merge_ends(ends: Sequence[FloatArray], n_samples: Sequence[int]) -> FloatArray:
    """FedAvg of the owners' M_1 | M_P buffers."""
    if not ends:
        raise RoundError("mpsl: no owner sent M_1 and M_P this epoch")
    return fedavg(list(ends), list(n_samples))


def assemble(parts: Sequence[FloatArray], offsets: Sequence[Sequence[tuple[int, int]]], total: int) -> FloatArray:
    """The full model's flat buffer from every part's weights and where each tensor of it sits."""
    out = np.full(total, np.nan, dtype=np.float32)
    for flat, spans in zip(parts, offsets, strict=True):
        at = 0
        for a, b in spans:
            out[a:b] = flat[at:at + b - a]
            at += b - a
        if at != len(flat):
            raise RoundError(f"mpsl: a part of {len(flat)} weights does not fill its {at} slots")
    if np.isnan(out).any():
        raise RoundError(f"mpsl: {int(np.isnan(out).sum())} coordinates of the model came from no part")
    return out


class Server(ServerMethod):
    name = "mpsl"
