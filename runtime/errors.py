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


# ---------------------------------------------------------------- exit codes
# What a command returns, by the kind of error that stopped it, so scripts and systemd can tell
# a typo from a dead broker. 1 is left for "ran, but failed" (e.g. no aggregation happened),
# 2 is bad usage (argparse), 130 is Ctrl-C.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_ARTIFACT = 4
EXIT_TRANSPORT = 5
EXIT_TRAINER = 6
EXIT_ROUND = 7
EXIT_SENSOR = 8
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[type[OrchardError], int] = {
    ConfigError: EXIT_CONFIG,
    DatasetError: EXIT_CONFIG,
    ArtifactError: EXIT_ARTIFACT,
    LayoutError: EXIT_ARTIFACT,
    TransportError: EXIT_TRANSPORT,
    ProtocolError: EXIT_TRANSPORT,
    TrainerError: EXIT_TRAINER,
    RoundError: EXIT_ROUND,
}


def register_exit_code(cls: type[OrchardError], code: int) -> type[OrchardError]:
    """For error classes defined outside this module (runtime/power_sensors.py)."""
    EXIT_CODES[cls] = code
    return cls


def exit_code(exc: OrchardError) -> int:
    """The code of the nearest mapped class in `exc`'s ancestry (a subclass inherits its base's)."""
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_FAILED


MESSAGE_MAX = 400  # characters of an error line; a message may quote a value a client sent


def one_line(exc: BaseException, limit: int = MESSAGE_MAX) -> str:
    """`exc`'s message as one line of at most `limit` characters (newlines folded, the rest cut)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
