"""The numpy reference every MLP training test checks against: cross-entropy gradients of the
fc1 → ReLU → fc2 → ReLU → out MLP, in float64, written out by hand (no autograd to trust)."""

from __future__ import annotations

import numpy as np


def mlp_ce_grads(w: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Gradients of the mean cross-entropy at weights `w` on the batch (x, y)."""
    n = len(y)
    a0 = x.reshape(n, -1).astype(np.float64)
    z1 = a0 @ w["fc1.W"].T + w["fc1.b"]
    a1 = np.maximum(z1, 0)
    z2 = a1 @ w["fc2.W"].T + w["fc2.b"]
    a2 = np.maximum(z2, 0)
    z3 = a2 @ w["out.W"].T + w["out.b"]
    d3 = np.exp(z3 - z3.max(axis=1, keepdims=True))
    d3 /= d3.sum(axis=1, keepdims=True)
    d3[np.arange(n), y] -= 1.0
    d3 /= n  # mean reduction of the cross-entropy
    d2 = (d3 @ w["out.W"]) * (z2 > 0)
    d1 = (d2 @ w["fc2.W"]) * (z1 > 0)
    return {"out.W": d3.T @ a2, "out.b": d3.sum(0), "fc2.W": d2.T @ a1, "fc2.b": d2.sum(0),
            "fc1.W": d1.T @ a0, "fc1.b": d1.sum(0)}
