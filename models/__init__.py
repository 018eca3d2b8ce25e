"""Orchard models: ONNX builders, training artifacts and their cache, datasets, partitions."""
