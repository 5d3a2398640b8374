"""Errors that tlm reports to the user as one clear line instead of a traceback."""


class TLMError(Exception):
    """Base class: the CLI prints the message and exits with status 2."""


class ConfigError(TLMError, ValueError):
    """A configuration names a key that does not exist, or holds a value that cannot work."""


class CheckpointError(TLMError):
    """A model directory is missing, incomplete, or does not match its config."""


class ExportError(TLMError):
    """The model cannot be written in the requested foreign format."""


class TrainingError(TLMError):
    """Training cannot go on (non-finite gradients under the stop policy): the message says what was kept."""
