"""Errors that tlm reports to the user as one clear line instead of a traceback (`tlm: error: ...`, exit 2).

They live in the base layer (tlm_base), below both of tlm's packages, so that both can raise them."""


class TLMError(Exception):
    """Base class: the CLI prints the message and exits with `exit_status` (2)."""

    exit_status = 2

    reported_by_rank0 = False
    """True when every rank raises the same error and rank 0 alone should print it."""


class RankAgreedError(TLMError):
    """An error rank 0 found and every rank stops on (the other ranks stay quiet)."""

    reported_by_rank0 = True


class ConfigError(TLMError, ValueError):
    """A configuration names a key that does not exist, or holds a value that cannot work."""


class CheckpointError(TLMError):
    """A model directory is missing, incomplete, or does not match its config."""


class ExportError(TLMError):
    """The model cannot be written in the requested foreign format."""


class TrainingError(TLMError):
    """Training cannot go on (non-finite gradients under the stop policy): the message says what was kept."""


class LostPeerError(TrainingError):
    """Another rank stopped answering (it failed, was killed, or its node went down): a transient failure, so the
    exit status is 75 (EX_TEMPFAIL, "try again"), which the Slurm scripts requeue on; the checkpoint is intact."""

    exit_status = 75


class DataError(TLMError):
    """A data source is missing, unreadable or malformed; the message names the file (and line)."""
