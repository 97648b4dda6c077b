"""The one CSV layer: read a table into dicts, write one atomically, append a row.

Every CSV voxreg reads or writes (pair lists, landmarks, metrics.csv, results.csv,
manifest.csv, lambda_curve.csv, summaries) goes through these three functions, so
encoding, newline handling, atomic replacement and error messages are the same everywhere.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from voxreg.core.errors import VoxregError, short_reason
from voxreg.io.files import PathLike, atomic_path


def read_table(path: PathLike, what: str = "CSV") -> list[dict[str, str]]:
    """Rows of a CSV file with a header as dicts of strings (a BOM is tolerated);
    a missing or unreadable file is one-line VoxregError naming it."""
    path = Path(path)
    if not path.is_file():
        raise VoxregError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return [dict(row) for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise VoxregError(f"{path}: cannot read as {what} ({short_reason(exc)})") from exc


def cell(value: Any) -> Any:
    """A CSV cell: None and non-finite floats become empty, floats keep full precision."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(value)
    return value


def write_table(path: PathLike, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (dicts; missing keys empty, unknown keys refused) under a header of
    ``columns``, atomically (temporary name, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({key: cell(value) for key, value in row.items()})
    return path


def append_row(path: PathLike, columns: Sequence[str], row: Mapping[str, Any]) -> None:
    """Append one row to a CSV written by :func:`write_table` with the same ``columns``."""
    with open(path, "a", newline="", encoding="utf-8") as handle:
        csv.DictWriter(handle, fieldnames=list(columns), restval="").writerow(
            {key: cell(value) for key, value in row.items()}
        )
