"""Exceptions that voxreg raises for bad user input.

Every error a user can cause (missing file, wrong format, bad shape, corrupted
checkpoint...) is a :class:`VoxregError`. The CLI prints its message as one line
and exits with code 2, without a traceback.
"""

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class VoxregError(Exception):
    """Bad input or configuration: the message says which file/argument and why."""


class CheckpointError(VoxregError):
    """A checkpoint file is missing, corrupted or belongs to another model."""


def one_line(text: str, limit: int = 300) -> str:
    """Collapse whitespace so a message fits on one line (cut to ``limit`` characters)."""
    line = " ".join(_ANSI.sub("", str(text)).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def short_reason(exc: BaseException) -> str:
    """Short, one-line reason of a library exception (ITK messages are very verbose)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:
        if "ERROR" in line:
            return one_line(line.split("): ", 1)[-1].replace("sitk::ERROR: ", ""))
    return one_line(lines[0]) if lines else type(exc).__name__
