"""Console output of the CLI: user errors as one line (exit 2) and a rich progress bar."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from voxreg.core.errors import VoxregError

console = Console(stderr=True)


def user_errors(command: Callable) -> Callable:
    """Turn VoxregError (and other input errors) into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except VoxregError as exc:
            typer.echo(f"voxreg: error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("voxreg: interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar shown from the first update on (so input errors print alone);
    yields a ``callback(done, total, info="")``; ``info`` is shown after the ETA."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    bar = Progress(*columns, console=console, transient=False)
    task = None

    def update(done: int, total: int, info: str = "") -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=total, info=info)
        bar.update(task, completed=done, total=total, info=info)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()
