"""All-or-nothing output folders: a run writes its files into a hidden staging folder
inside the output folder and moves them into place only when everything succeeded.

:func:`staged_outputs` is the one entry point::

    with staged_outputs(outdir, inputs=[fixed, moving], outputs=REGISTER_OUTPUTS) as stage:
        ...  # write files into ``stage``
    # here every file of ``stage`` is in ``outdir``; on an exception (or SIGTERM/SIGINT)
    # nothing new is left in ``outdir`` and the staging folder is gone

Before any work it refuses (one-line :class:`VoxregError`) an output folder where an input
file would be overwritten or deleted (an input named like an output of this run, also
through symlinks), and, with ``lock=True``, a folder another voxreg run is writing to
(``fcntl.flock`` on ``OUT/.voxreg.lock``; the lock file is removed again at the end).
SIGTERM raises :class:`Terminated` inside the block (exit code 143 in the CLI), SIGINT
``KeyboardInterrupt`` (130), so cleanup runs in both cases.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from voxreg.core.errors import VoxregError
from voxreg.io.files import PathLike

STAGING_PREFIX = ".voxreg-staging-"
LOCK_NAME = ".voxreg.lock"

# file names `voxreg register` writes (and removes when stale: see README, "Outputs")
REGISTER_OUTPUTS = (
    "warped.nii.gz",
    "warped_*.nii.gz",
    "field.nii.gz",
    "field_itk.nii.gz",
    "field_inverse.nii.gz",
    "field_itk_inverse.nii.gz",
    "affine.txt",
    "metrics.json",
    "figure.png",
)


class Terminated(BaseException):
    """Raised inside a :func:`staged_outputs` block when the process receives SIGTERM."""


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def check_inputs_untouched(outdir: PathLike, inputs: Iterable[PathLike | None], outputs: Sequence[str]) -> None:
    """Raise VoxregError when a file of ``outdir`` named like one of ``outputs`` (glob
    patterns) is an input, directly or through a symlink (either way round)."""
    folder = Path(outdir).resolve()
    inputs = [item for item in inputs if item is not None]
    resolved = {Path(item).resolve(): item for item in inputs}
    for pattern in outputs:  # an output name that is (a link to) an input
        if not any(char in pattern for char in "*?["):
            target = (folder / pattern).resolve()
            if target in resolved:
                raise VoxregError(
                    f"{resolved[target]}: input would be overwritten by the output {Path(outdir) / pattern}; "
                    "choose another output folder or name"
                )
    for item in inputs:
        path = Path(item)
        candidates = {path.resolve()}
        with contextlib.suppress(OSError):
            candidates.add(path.absolute().parent.resolve() / path.name)  # the link itself
        for candidate in candidates:
            if candidate.parent == folder and _matches(candidate.name, outputs):
                raise VoxregError(
                    f"{item}: input would be overwritten by the output {folder / candidate.name}; "
                    "choose another output folder or name"
                )


@contextlib.contextmanager
def _folder_lock(outdir: Path) -> Iterator[None]:
    """Exclusive non-blocking flock on ``outdir/.voxreg.lock`` (removed on release)."""
    path = outdir / LOCK_NAME
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VoxregError(f"another voxreg run is writing to {outdir}") from None
        try:  # the holder before us may have removed the file: lock the current one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    else:  # pragma: no cover - endless races
        raise VoxregError(f"cannot lock {path}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` (main thread only; restored afterwards)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Defer SIGTERM/SIGINT (delivered when the block ends)."""
    signals = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _make_folder(outdir: Path) -> list[Path]:
    """Create ``outdir`` (and parents); return the folders created, deepest first."""
    created: list[Path] = []
    probe = outdir
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        if not os.access(outdir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        _remove_empty(created)
        raise VoxregError(f"output directory {outdir} is not writable ({exc.strerror or type(exc).__name__})") from exc
    return created


def _remove_empty(folders: Sequence[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def staged_outputs(
    outdir: PathLike,
    inputs: Iterable[PathLike | None] = (),
    outputs: Sequence[str] = ("*",),
    lock: bool = True,
    remove_stale: bool = False,
) -> Iterator[Path]:
    """Yield a fresh hidden staging folder ``outdir/.voxreg-staging-<random>/``.

    On success every file written there is moved into ``outdir`` (replacing files of the
    same name) and, with ``remove_stale``, files of ``outdir`` matching ``outputs`` that
    this run did not write are deleted (so earlier outputs never pass for this run's). On
    any exception, SIGTERM or SIGINT the staging folder is removed, as are the lock file
    and the folders this call created: nothing new is left. ``inputs`` named like an
    ``outputs`` pattern inside ``outdir`` are refused before anything is created.
    """
    outdir = Path(outdir)
    inputs = list(inputs)
    check_inputs_untouched(outdir, inputs, outputs)
    created = _make_folder(outdir)
    committed = False
    try:
        with contextlib.ExitStack() as stack:
            if lock:
                stack.enter_context(_folder_lock(outdir))
            stack.enter_context(_signals_raise())
            stage = outdir / f"{STAGING_PREFIX}{secrets.token_hex(6)}"
            try:
                stage.mkdir()
                yield stage
                names = sorted(p.name for p in stage.iterdir())
                bad = [n for n in names if not _matches(n, outputs)]
                if bad:
                    raise VoxregError(f"{outdir}: unexpected output {bad[0]} (not one of {', '.join(outputs)})")
                check_inputs_untouched(outdir, inputs, names)
                with _signals_blocked():  # a signal now waits until the set is in place
                    for name in names:
                        os.replace(stage / name, outdir / name)
                    committed = True
                    if remove_stale:
                        for old in outdir.iterdir():
                            if old.name not in names and _matches(old.name, outputs) and old.is_file():
                                old.unlink()
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    finally:
        if not committed:
            _remove_empty(created)
