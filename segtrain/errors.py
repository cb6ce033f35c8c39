"""The errors a user causes through the config, the data or the machine; ``train.py`` prints their
message alone (one line, exit code 1). Real bugs keep their traceback.

This module imports nothing from segtrain: every layer may raise these.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


class LossParamError(ValueError):
    """A loss parameter with a bad value; ``key`` is its config path (``loss.weight``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    def under(self, prefix: str) -> "LossParamError":
        """The same error with the key moved under ``prefix`` (for the terms of a sum)."""
        return LossParamError(prefix + self.key.removeprefix("loss"), self.message)


class MaskValueError(ValueError):
    """A mask holds values that are no class of the model and not the ignore index."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker's error is re-raised in the training process as
        # ``type(error)("Caught ... Original Traceback ...: <message>")``: keep the message alone,
        # so train.py prints one line a user can act on rather than a worker's traceback.
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class UnknownNameError(KeyError):
    """Raised for a config that names something no registry knows."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class TrainingError(RuntimeError):
    """Training cannot go on (repeated non-finite losses, out of memory); the message says what to change."""


class ExportError(RuntimeError):
    """The model could not be exported, or the exported files do not compute what the model does."""


class RankError(RuntimeError):
    """A DDP worker was killed, or stopped on one of the errors above: one line naming the rank."""


USER_ERRORS = (ConfigError, ExportError, LossParamError, MaskValueError, UnknownNameError, TrainingError, RankError)
