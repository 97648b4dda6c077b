"""The result store of ``voxreg evaluate``: ``results.csv`` (:data:`RESULT_COLUMNS`, one row
per pair and method) and ``per_structure.csv`` (:data:`STRUCTURE_COLUMNS`), read back to
resume and rewritten atomically after every row through :mod:`voxreg.io.tables`.
Floats are written with 6 significant digits, NaN and None as empty cells."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from voxreg.core.errors import VoxregError
from voxreg.evaluation.types import Row
from voxreg.io.tables import read_table, write_table

RESULT_COLUMNS = (
    "id",
    "fixed",
    "moving",
    "method",
    "status",
    "error",
    "dice_mean",
    "dice_std",
    "hd95_mean_mm",
    "folding_percent",
    "sdlogj",
    "ncc_before",
    "ncc_after",
    "mi_before",
    "mi_after",
    "tre_before_mm",
    "tre_after_mm",
    "seconds",
    "peak_memory_mb",
    "device",
    "threads",
    "settings",
    "dice_before",
)
STRUCTURE_COLUMNS = ("id", "method", "label", "name", "dice", "hd95_mm")

_TEXT_COLUMNS = {"id", "fixed", "moving", "method", "status", "error", "device", "settings", "name"}
_INT_COLUMNS = {"threads", "label"}


class ResultStore:
    """results.csv and per_structure.csv of an output folder, rewritten atomically (temporary
    name in the same folder, then ``os.replace``) after every row."""

    def __init__(self, outdir: Path) -> None:
        self.results_csv = outdir / "results.csv"
        self.structures_csv = outdir / "per_structure.csv"
        self.rows = read_rows(self.results_csv)
        self.structures = read_rows(self.structures_csv)

    def is_done(self, pair_id: str, method: str) -> bool:
        """True when (pair_id, method) already has a row with status ok."""
        return any(r.get("id") == pair_id and r.get("method") == method and r.get("status") == "ok" for r in self.rows)

    def add(self, row: Row, structures: Sequence[Row]) -> None:
        """Replace any earlier rows of (id, method) by these and rewrite both files."""
        key = (row["id"], row["method"])
        self.rows = [r for r in self.rows if (r.get("id"), r.get("method")) != key] + [row]
        self.structures = [r for r in self.structures if (r.get("id"), r.get("method")) != key]
        self.structures += [{"id": row["id"], "method": row["method"], **s} for s in structures]
        write_rows(self.structures_csv, STRUCTURE_COLUMNS, self.structures)
        write_rows(self.results_csv, RESULT_COLUMNS, self.rows)


def read_rows(path: Path) -> list[Row]:
    """Rows of an earlier results/per-structure CSV, with numbers as int/float (empty: NaN);
    no rows when the file does not exist."""
    if not path.exists():
        return []
    rows = read_table(path, what="earlier results to resume")
    try:
        return [{k: _typed(k, v) for k, v in row.items() if k is not None} for row in rows]
    except ValueError as exc:
        raise VoxregError(f"{path}: cannot read the earlier results to resume ({exc})") from exc


def _typed(column: str, text: str | None) -> Any:
    text = text or ""
    if column in _TEXT_COLUMNS:
        return text
    if column in _INT_COLUMNS:
        return int(text) if text else None
    return float(text) if text else float("nan")


def write_rows(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` under ``columns`` atomically (keys outside ``columns`` ignored), each
    value as :func:`_csv_value` text."""
    return write_table(path, columns, [{k: _csv_value(v) for k, v in row.items() if k in columns} for row in rows])


def _csv_value(value: Any) -> str:
    """CSV text of a value: floats with 6 significant digits, NaN/None as empty."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if not math.isfinite(value) else format(float(value), ".6g")
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)
