"""Orchard device runtime: what goes onto a board.

Depends on numpy, onnxruntime-training, paho-mqtt and psutil only; imports nothing from
`server`, `testbed` or `models` (a test enforces it).
"""

__version__ = "0.1.0"
