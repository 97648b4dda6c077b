"""The ``voxreg`` command line (typer): thin commands over the lower layers."""

from voxreg.cli.app import app, main

__all__ = ["app", "main"]
