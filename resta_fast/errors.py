"""The one error type users see: a clear message, exit code 2, no traceback."""


class RestaError(Exception):
    """Bad input or a refused operation; the message names file/tensor and the fix."""

    exit_code = 2


class CheckpointError(RestaError):
    """A checkpoint file or directory is malformed or unreadable."""
