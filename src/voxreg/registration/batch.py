"""Many registrations in one process: ``voxreg register-batch`` without the argument parsing.

:func:`run_batch` reads a pair list (CSV columns ``fixed,moving[,fixed_labels,moving_labels][,id]``),
registers every pair with :func:`voxreg.registration.pipeline.register` and writes each into
``OUTDIR/<id>/`` with the outputs of ``voxreg register``, all or nothing
(:func:`voxreg.registration.outputs.save_outputs`). The checkpoint is read once. A small
thread pool reads the next pair and writes the previous one while the current one is
computed. A pair whose folder already holds a complete ``metrics.json`` (every file it
lists present) is skipped, so a killed batch resumes where it stopped. A failing pair is
recorded (status ``failed`` and its error) and the batch goes on.

Under ``torchrun`` (env ``WORLD_SIZE``/``RANK``) rank ``r`` of ``W`` takes pairs ``r, r+W, ...``
and writes only their folders and ``OUTDIR/batch.rank<r>.csv``; every rank, when done, merges
all rank tables into ``OUTDIR/batch.csv`` under a file lock, so the last one to finish leaves
the complete table (pairs of ranks still running show as ``pending``). No process group is
needed. With CUDA, rank ``r`` uses ``cuda:LOCAL_RANK``. ``on_merged(outdir)``, when given, runs
after each merge under the same lock (the CLI passes the cohort QC report, which adds columns
to batch.csv and writes report.html: this layer does not import :mod:`voxreg.cohort`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from voxreg.core.errors import VoxregError, short_reason
from voxreg.core.image import Image
from voxreg.core.runtime import configure_allocator, resolve_device
from voxreg.io import tables
from voxreg.registration import outputs, pipeline

__all__ = [
    "BatchPair",
    "BatchSummary",
    "is_complete",
    "rank_and_world",
    "read_pairs",
    "run_batch",
    "shard",
]

COLUMNS = ("id", "status", "seconds", "dice", "error", "fixed", "moving")
PAIR_COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels", "id")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ProgressCallback = Callable[[int, int], None]
MergedCallback = Callable[[Path], Any]
RegisterFn = Callable[..., outputs.RegistrationResult]


@dataclass(frozen=True)
class BatchPair:
    """One row of the pair list (paths resolved against the list's folder)."""

    id: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    # a known affine stage (fixed world -> moving world, 4x4), e.g. a template build's last one
    world_matrix: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class BatchSummary:
    """What one rank did: its table rows, counts and wall time; ``table`` is batch.csv."""

    rows: list[dict[str, Any]]
    seconds: float
    table: Path
    rank: int = 0
    world: int = 1
    merged: Any = None  # what ``on_merged`` returned (e.g. the cohort report)

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows)

    @property
    def failed(self) -> int:
        return self.count("failed")

    def line(self) -> str:
        """One-line summary: counts, wall time and pairs per minute of the pairs registered."""
        done = self.count("ok")
        rate = 60.0 * done / self.seconds if self.seconds > 0 and done else 0.0
        prefix = f"rank {self.rank}/{self.world}: " if self.world > 1 else ""
        return (
            f"{prefix}{len(self.rows)} pairs: {done} ok, {self.count('skipped')} skipped (done before), "
            f"{self.failed} failed in {self.seconds:.1f} s ({rate:.1f} pairs/min); table {self.table}"
        )


# --------------------------------------------------------------------------- pair list


def read_pairs(path: str | Path) -> list[BatchPair]:
    """Pairs of a CSV with columns ``fixed,moving`` and optionally ``fixed_labels,moving_labels``
    and ``id`` (default: the row number, ``0001``...). Relative paths are relative to the CSV's
    folder. Raises VoxregError naming the file and row for a missing column, a bad or
    repeated id, or labels given on one side only."""
    path = Path(path)
    rows = tables.read_table(path, "pair list")
    if not rows:
        raise VoxregError(f"{path}: pair list has no rows")
    header = set(rows[0])
    missing = [name for name in ("fixed", "moving") if name not in header]
    if missing:
        raise VoxregError(f"{path}: pair list needs the columns fixed,moving (missing {', '.join(missing)})")
    unknown = sorted(header - set(PAIR_COLUMNS))
    if unknown:
        raise VoxregError(f"{path}: unknown column {unknown[0]} (expected {','.join(PAIR_COLUMNS)})")
    base = path.resolve().parent
    pairs: list[BatchPair] = []
    seen: set[str] = set()
    for number, row in enumerate(rows, start=1):
        where = f"{path}: row {number}"
        values = {key: (value or "").strip() for key, value in row.items() if key is not None}
        if not values.get("fixed") or not values.get("moving"):
            raise VoxregError(f"{where}: fixed and moving must both be given")
        pair_id = values.get("id") or f"{number:04d}"
        if not _ID.match(pair_id):
            raise VoxregError(f"{where}: id {pair_id!r} is not a plain folder name (letters, digits, . _ -)")
        if pair_id in seen:
            raise VoxregError(f"{where}: id {pair_id} is repeated")
        seen.add(pair_id)
        labels = values.get("fixed_labels"), values.get("moving_labels")
        if bool(labels[0]) != bool(labels[1]):
            raise VoxregError(f"{where}: give both fixed_labels and moving_labels, or neither")

        def resolve(name: str | None) -> Path | None:
            return None if not name else base / Path(name).expanduser()

        fixed, moving = resolve(values["fixed"]), resolve(values["moving"])
        assert fixed is not None and moving is not None
        pairs.append(BatchPair(pair_id, fixed, moving, resolve(labels[0]), resolve(labels[1])))
    return pairs


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from ``torchrun``'s env ``RANK``/``WORLD_SIZE`` ((0, 1) without)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise VoxregError("RANK and WORLD_SIZE must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise VoxregError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    return rank, world


def shard(pairs: Sequence[BatchPair], rank: int, world: int) -> list[BatchPair]:
    """The pairs rank ``rank`` of ``world`` registers: ``rank, rank + world, ...``."""
    return list(pairs[rank::world])


def rank_device(device: str, world: int) -> str:
    """``device`` for this rank: under torchrun with CUDA, ``cuda:LOCAL_RANK`` (one GPU each)."""
    import torch

    if world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return device


def is_complete(folder: str | Path) -> bool:
    """True when ``folder/metrics.json`` is valid JSON and every output it lists exists
    (outputs are moved into place one by one: a kill can leave metrics.json alone)."""
    folder = Path(folder)
    try:
        payload = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    names = payload.get("outputs") if isinstance(payload, dict) else None
    return isinstance(names, list) and all((folder / str(name)).is_file() for name in names)


# --------------------------------------------------------------------------- running


@dataclass
class _Loaded:
    fixed: Image
    moving: Image
    fixed_labels: Image | None
    moving_labels: Image | None


def _load(pair: BatchPair) -> _Loaded:
    """Read one pair's images (runs in the io pool)."""
    return _Loaded(
        pipeline.as_image(pair.fixed),
        pipeline.as_image(pair.moving),
        None if pair.fixed_labels is None else pipeline.as_image(pair.fixed_labels, label=True),
        None if pair.moving_labels is None else pipeline.as_image(pair.moving_labels, label=True),
    )


def _save(
    result: outputs.RegistrationResult, folder: Path, figure: bool, files: outputs.OutputFiles, inputs: Sequence[Any]
) -> float:
    """Write one pair's outputs (runs in the io pool); returns the seconds it took."""
    start = time.perf_counter()
    outputs.save_outputs(result, folder, figure, inputs=[item for item in inputs if item is not None], files=files)
    return time.perf_counter() - start


def _error_text(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, VoxregError) else f"{type(exc).__name__}: {short_reason(exc)}"
    return " ".join(text.split())[:300]


def run_batch(
    pairs: Sequence[BatchPair] | str | Path,
    outdir: str | Path,
    *,
    model: str | Path | None = None,
    engine: str = "auto",
    device: str = "auto",
    workers: int = 2,
    figure: bool = True,
    files: outputs.OutputFiles | None = None,
    progress: ProgressCallback | None = None,
    register: RegisterFn | None = None,
    on_merged: MergedCallback | None = None,
    **options: Any,
) -> BatchSummary:
    """Register this rank's share of ``pairs`` (a list or a pair-list CSV) into ``outdir/<id>/``.

    ``options`` go to :func:`voxreg.registration.pipeline.register` (``similarity``, ``lam``,
    ``refine``, ``affine``, ``affine_only``...); metrics are always measured (Dice with labels).
    ``workers`` io threads read ahead and write behind (0: everything in turn). ``files``
    leaves optional fields out (:class:`~voxreg.registration.outputs.OutputFiles`).
    ``progress(done, total)`` follows this rank's pairs; ``register`` replaces the pipeline
    (tests). Returns this rank's :class:`BatchSummary`; ``outdir/batch.csv`` is merged at the end,
    then ``on_merged(outdir)`` runs under the merge lock (its result in ``summary.merged``).
    """
    if workers < 0:
        raise VoxregError(f"--workers must be >= 0, got {workers}")
    all_pairs = read_pairs(pairs) if isinstance(pairs, (str, Path)) else list(pairs)
    rank, world = rank_and_world()
    mine = shard(all_pairs, rank, world)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    register_fn = register or pipeline.register
    device = rank_device(device, world)
    rank_table = outdir / f"batch.rank{rank}.csv"
    tables.write_table(rank_table, COLUMNS, [])
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        tables.append_row(rank_table, COLUMNS, row)
        if progress is not None:
            progress(len(rows), len(mine))

    configure_allocator()  # before the io threads start (they then share the main heap)
    todo = []
    for pair in mine:
        if is_complete(outdir / pair.id):
            record(_row(pair, "skipped", None, _dice_of(outdir / pair.id)))
        else:
            todo.append(pair)
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        if model is not None:  # a bad checkpoint fails once, before any pair; then it stays loaded
            resolved = pipeline.resolve_model(model, engine, 3)
            if resolved is not None:
                pipeline.loaded_checkpoint(resolved, resolve_device(device))
        run = _Runner(
            pool,
            workers,
            outdir,
            figure,
            files or outputs.OutputFiles(),
            record,
            register_fn,
            model,
            engine,
            device,
            options,
        )
        run.all(todo)
    summary = BatchSummary(rows, time.perf_counter() - start, outdir / "batch.csv", rank, world)
    summary.merged = merge_tables(outdir, all_pairs, world, on_merged)[1]
    return summary


def _row(pair: BatchPair, status: str, seconds: float | None, dice: Any = None, error: str = "") -> dict[str, Any]:
    return {
        "id": pair.id,
        "status": status,
        "seconds": None if seconds is None else round(seconds, 3),
        "dice": dice,
        "error": error,
        "fixed": str(pair.fixed),
        "moving": str(pair.moving),
    }


def _dice_of(folder: Path) -> Any:
    """dice_mean_after recorded in ``folder/metrics.json`` (None when absent)."""
    try:
        return json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("dice_mean_after")
    except (OSError, ValueError, AttributeError):
        return None


class _Runner:
    """Compute in the calling thread; read the next pair and write the previous ones in ``pool``."""

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        workers: int,
        outdir: Path,
        figure: bool,
        files: outputs.OutputFiles,
        record: Callable[[dict[str, Any]], None],
        register: RegisterFn,
        model: str | Path | None,
        engine: str,
        device: str,
        options: dict[str, Any],
    ) -> None:
        self.pool, self.workers, self.outdir = pool, workers, outdir
        self.figure, self.files = figure, files
        self.record, self.register = record, register
        self.kwargs = {"model": model, "engine": engine, "device": device, **options}
        self.model = model
        self.writing: list[tuple[BatchPair, Future[float], float, Any]] = []

    def _submit_load(self, pair: BatchPair) -> Future[_Loaded]:
        if self.workers == 0:
            future: Future[_Loaded] = Future()
            try:
                future.set_result(_load(pair))
            except Exception as exc:
                future.set_exception(exc)
            return future
        return self.pool.submit(_load, pair)

    def all(self, pairs: Sequence[BatchPair]) -> None:
        loading = self._submit_load(pairs[0]) if pairs else None
        for index, pair in enumerate(pairs):
            assert loading is not None
            current = loading
            loading = self._submit_load(pairs[index + 1]) if index + 1 < len(pairs) else None
            self.one(pair, current)
            while len(self.writing) > max(self.workers - 1, 0):
                self._finish_oldest()
        while self.writing:
            self._finish_oldest()

    def one(self, pair: BatchPair, loading: Future[_Loaded]) -> None:
        start = time.perf_counter()
        try:
            loaded = loading.result()
            result = self.register(
                loaded.fixed,
                loaded.moving,
                moving_labels=None if loaded.moving_labels is None else [loaded.moving_labels],
                fixed_labels=loaded.fixed_labels,
                world_matrix=pair.world_matrix,
                metrics=True,
                **self.kwargs,
            )
        except Exception as exc:
            self.record(_row(pair, "failed", time.perf_counter() - start, error=_error_text(exc)))
            return
        seconds = time.perf_counter() - start
        inputs = [pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels, self.model]
        folder = self.outdir / pair.id
        if self.workers == 0:
            future: Future[float] = Future()
            try:
                future.set_result(_save(result, folder, self.figure, self.files, inputs))
            except Exception as exc:
                future.set_exception(exc)
        else:
            future = self.pool.submit(_save, result, folder, self.figure, self.files, inputs)
        self.writing.append((pair, future, seconds, result.metrics.get("dice_mean_after")))

    def _finish_oldest(self) -> None:
        pair, future, seconds, dice = self.writing.pop(0)
        try:
            seconds += future.result()
        except Exception as exc:
            self.record(_row(pair, "failed", seconds, error=_error_text(exc)))
            return
        self.record(_row(pair, "ok", seconds, dice))


# --------------------------------------------------------------------------- merged table


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def merge_tables(
    outdir: str | Path, pairs: Sequence[BatchPair], world: int, on_merged: MergedCallback | None = None
) -> tuple[Path, Any]:
    """Write ``outdir/batch.csv``: one row per pair of the list, in its order, from the rank
    tables ``batch.rank<r>.csv`` (r < ``world``); pairs no rank has finished yet are
    ``pending``. Serialised by a file lock, so the last rank to merge sees every table;
    ``on_merged(outdir)`` runs under the lock too. Returns (batch.csv, what on_merged returned)."""
    outdir = Path(outdir)
    with _locked(outdir / ".voxreg-batch.lock"):
        found: dict[str, dict[str, Any]] = {}
        for rank in range(world):
            table = outdir / f"batch.rank{rank}.csv"
            if table.is_file():
                for row in tables.read_table(table, "batch table"):
                    found[row.get("id", "")] = row
        rows = [found.get(pair.id) or _row(pair, "pending", None) for pair in pairs]
        columns = COLUMNS if any(pair.fixed_labels for pair in pairs) else tuple(c for c in COLUMNS if c != "dice")
        table = tables.write_table(
            outdir / "batch.csv", columns, [{k: v for k, v in row.items() if k in columns} for row in rows]
        )
        return table, None if on_merged is None else on_merged(outdir)
