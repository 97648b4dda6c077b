"""Exceptions that voxreg raises for bad user input.

Every error a user can cause (missing file, wrong format, bad shape, corrupted
checkpoint...) is a :class:`VoxregError`. The CLI prints its message as one line
and exits with code 2, without a traceback.
"""


class VoxregError(Exception):
    """Bad input or configuration: the message says which file/argument and why."""


class CheckpointError(VoxregError):
    """A checkpoint file is missing, corrupted or belongs to another model."""
