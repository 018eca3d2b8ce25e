"""Orchard device runtime: what goes onto a board.

Depends on numpy, onnxruntime-training, paho-mqtt and psutil only; imports nothing from
`server`, `testbed` or `models` (a test enforces it).
"""

from __future__ import annotations

__version__ = "0.1.0"
