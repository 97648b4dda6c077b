"""Pair lists of ``voxreg evaluate``: the pairs CSV, landmark CSVs, the scored structures
and loading a pair (:func:`load_pair` -> :class:`~voxreg.evaluation.types.PairData`). CSVs
are read through :func:`voxreg.io.tables.read_table`.

Pairs CSV: a header row with ``fixed,moving`` (required) and optionally ``fixed_labels``,
``moving_labels``, ``fixed_landmarks``, ``moving_landmarks`` and ``id``; relative paths are
resolved against the CSV's folder; the default id is ``<moving stem>_to_<fixed stem>``.
Landmark files are CSVs with header ``x,y,z`` in world RAS mm, the same number of rows on
both sides (row ``i`` of the fixed file corresponds to row ``i`` of the moving).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from voxreg import io, metrics
from voxreg.core.errors import VoxregError
from voxreg.evaluation.types import Pair, PairData
from voxreg.io.tables import read_table

PathLike = str | os.PathLike
#: label presets of ``--structures`` (:func:`voxreg.io.labels.preset`)
STRUCTURE_PRESETS = ("aseg30", "dkt31")
PAIR_COLUMNS = ("id", "fixed", "moving", "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks")


def read_pairs(path: PathLike) -> list[Pair]:
    """Parse and check a pairs CSV (files exist, labels/landmarks given on both sides,
    landmark files readable with matching row counts, unique ids)."""
    path = Path(path)
    rows = _read_csv_rows(path)
    pairs = [_pair_from_row(row, line, path) for line, row in rows]
    seen: dict[str, int] = {}
    for (line, _), pair in zip(rows, pairs):
        if pair.id in seen:
            raise VoxregError(f"{path}: line {line}: id '{pair.id}' already used on line {seen[pair.id]}")
        seen[pair.id] = line
    return pairs


def _read_csv_rows(path: Path) -> list[tuple[int, dict[str | None, str]]]:
    """(line number, row) of a CSV with a header holding at least ``fixed`` and ``moving``
    (header names stripped; line numbers count the header as line 1)."""
    if not path.is_file():
        raise VoxregError(f"{path}: pairs CSV not found")
    raw = read_table(path)
    if not raw:
        raise VoxregError(f"{path}: no pairs (only a header)")
    rows = [
        (index + 2, {(k.strip() if k is not None else None): v for k, v in row.items()})
        for index, row in enumerate(raw)
    ]
    header = [k for k in rows[0][1] if k is not None]
    missing = [c for c in ("fixed", "moving") if c not in header]
    if missing:
        raise VoxregError(
            f"{path}: header must name the columns fixed,moving (missing {', '.join(missing)}; "
            f"found {', '.join(header) or 'nothing'})"
        )
    unknown = [c for c in header if c and c not in PAIR_COLUMNS]
    if unknown:
        raise VoxregError(f"{path}: unknown column(s) {', '.join(unknown)} (allowed: {', '.join(PAIR_COLUMNS)})")
    return rows


def _pair_from_row(row: Mapping[str | None, str | None], line: int, csv_path: Path) -> Pair:
    """A :class:`Pair` from one CSV row; paths resolved against the CSV's folder."""
    if None in row:
        raise VoxregError(f"{csv_path}: line {line}: more values than header columns")
    values = {k: (row.get(k) or "").strip() for k in PAIR_COLUMNS}
    paths: dict[str, Path | None] = {}
    for column in PAIR_COLUMNS[1:]:
        paths[column] = _resolve(values[column], column, line, csv_path)
    for column in ("fixed", "moving"):
        if paths[column] is None:
            raise VoxregError(f"{csv_path}: line {line}: empty '{column}' path")
    for kind in ("labels", "landmarks"):
        given = [paths[f"fixed_{kind}"] is not None, paths[f"moving_{kind}"] is not None]
        if given[0] != given[1]:
            raise VoxregError(f"{csv_path}: line {line}: fixed_{kind} and moving_{kind} must be given together")
    pair_id = values["id"] or f"{io.strip_extension(paths['moving'])}_to_{io.strip_extension(paths['fixed'])}"
    pair = Pair(pair_id, **paths)
    if pair.fixed_landmarks is not None:
        fixed_points, moving_points = read_landmarks(pair.fixed_landmarks), read_landmarks(pair.moving_landmarks)
        if len(fixed_points) != len(moving_points):
            raise VoxregError(
                f"{csv_path}: line {line}: {pair.fixed_landmarks} has {len(fixed_points)} landmarks "
                f"but {pair.moving_landmarks} has {len(moving_points)}"
            )
    return pair


def _resolve(value: str, column: str, line: int, csv_path: Path) -> Path | None:
    """Absolute path of a CSV cell (relative to the CSV's folder), None when empty."""
    if not value:
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else csv_path.parent / path
    if not path.exists():
        raise VoxregError(f"{csv_path}: line {line}: {column} file not found: {path}")
    return path


def read_landmarks(path: PathLike) -> np.ndarray:
    """Landmarks ``(n, 3)`` float64 (world RAS mm) from a CSV with header ``x,y,z``."""
    path = Path(path)
    rows = [{(k or "").strip().lower(): v for k, v in row.items()} for row in read_table(path, what="landmark CSV")]
    if rows and not {"x", "y", "z"} <= set(rows[0]):
        found = ",".join(k for k in rows[0] if k) or "nothing"
        raise VoxregError(f"{path}: landmark CSV needs a header with x,y,z (found {found})")
    try:
        points = [[float(row[c]) for c in "xyz"] for row in rows]
    except (TypeError, ValueError) as exc:
        raise VoxregError(f"{path}: landmark coordinates must be numbers ({exc})") from exc
    array = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if not array.size:
        raise VoxregError(f"{path}: no landmarks")
    if not np.all(np.isfinite(array)):
        raise VoxregError(f"{path}: landmark coordinates must be finite")
    return array


# --------------------------------------------------------------------------- structures


def structure_table(structures: str) -> dict[int, str] | None:
    """Code -> name of the scored structures: None for ``"all"`` (FreeSurfer names), a
    :func:`voxreg.io.labels.preset` name, or the path of a label table file (FreeSurfer LUT or
    ``code,name`` CSV, e.g. TotalSegmentator's labels.csv)."""
    from voxreg.io.labels import label_table, preset

    key = structures.strip().lower()
    if key == "all":
        return None
    if key in STRUCTURE_PRESETS:
        return preset(key)
    path = Path(structures)
    if path.is_file():
        return label_table(structures)
    if path.is_dir():
        raise VoxregError(f"--structures {structures}: is a folder; pass a label table file or a preset")
    if path.suffix or os.sep in structures or "/" in structures:
        raise VoxregError(f"--structures {structures}: file not found (a label table file, or a preset: aseg30, dkt31)")
    return preset(structures)


def select_labels(
    fixed_labels: np.ndarray, moving_labels: np.ndarray, structures: str = "all", exclude: Iterable[int] = (0,)
) -> list[int]:
    """Labels present in both maps, minus ``exclude``, restricted to :func:`structure_table`
    ``structures`` unless it is ``"all"``."""
    table = structure_table(structures)
    return metrics.common_labels(fixed_labels, moving_labels, exclude, None if table is None else table.keys())


def load_pair(pair: Pair) -> PairData:
    """Load a pair's images, label maps and landmarks (fixed labels resampled onto the
    fixed grid with nearest neighbour when their grid differs)."""
    from voxreg.registration.pipeline import as_image

    fixed, moving = as_image(pair.fixed), as_image(pair.moving)
    if fixed.ndim != moving.ndim:
        raise VoxregError(f"{pair.moving} is {moving.ndim}D but {pair.fixed} is {fixed.ndim}D")
    data = PairData(pair, fixed, moving)
    if pair.fixed_labels is not None:
        data.fixed_labels = io.resample_to(as_image(pair.fixed_labels, label=True), fixed, nearest=True)
        data.moving_labels = as_image(pair.moving_labels, label=True)
    if pair.fixed_landmarks is not None:
        data.fixed_points = read_landmarks(pair.fixed_landmarks)
        data.moving_points = read_landmarks(pair.moving_landmarks)
    return data
