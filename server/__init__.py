"""Orchard aggregator: round engine, strategies, MQTT adapter, checkpoints."""
