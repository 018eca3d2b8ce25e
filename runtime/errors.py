"""One exception tree for the whole project.

Every error a user can cause derives from `OrchardError`. The command line catches it at the
boundary and prints `error: <message>` on one line, so messages must name what was wrong
(the device, the round, the field, the value) on their own.
"""

from __future__ import annotations


class OrchardError(Exception):
    """Base of every error Orchard raises on purpose."""


class ConfigError(OrchardError):
    """A config file, campaign, profile or command-line value is invalid."""


class DatasetError(OrchardError):
    """A dataset is missing, truncated or malformed."""


class ArtifactError(OrchardError):
    """A training-artifact directory is missing, corrupted or does not match its layout."""


class LayoutError(OrchardError):
    """A parameter buffer or tensor does not fit the parameter layout."""


class TrainerError(OrchardError):
    """ONNX Runtime training failed, or the trainer process died."""


class ProtocolError(OrchardError):
    """A message or frame on the wire is malformed, corrupt or violates the schema."""


class TransportError(OrchardError):
    """The MQTT broker is unreachable or refused an operation."""


class RoundError(OrchardError):
    """An update or event does not fit the server's round state (unknown task, too stale, ...)."""
