"""Errors meant for users: one line, naming the file or flag and what is wrong."""


class AmbientInputError(ValueError):
    """Bad user input (a file, a flag, a value). The CLI prints it as one line and exits with 2."""
