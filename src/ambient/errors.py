"""Errors meant for users: one line, naming the file or flag and what is wrong."""


class AmbientError(Exception):
    """Base of the errors that the CLI reports as one line."""


class AmbientInputError(AmbientError, ValueError):
    """Bad user input (a file, a flag, a value). The CLI prints it as one line and exits with 2."""


class TrainingDiverged(AmbientError, RuntimeError):
    """Training stopped: too many consecutive steps had a non-finite loss or gradient (exit 1)."""


class SamplingDiverged(AmbientError, RuntimeError):
    """Sampling or restoring stopped: a trajectory left every plausible range (non-finite or huge values; exit 1)."""
