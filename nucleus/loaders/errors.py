"""The one error every loader raises for a checkpoint it cannot use."""


class CheckpointError(ValueError):
    """A missing, malformed or unsupported model file; the message names the file and the problem."""
