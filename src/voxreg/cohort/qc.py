"""Quality-control flags for a cohort of registrations: which pairs probably failed, and why.

Pure functions over per-pair value dicts (:func:`pair_values` turns one ``metrics.json`` into
one), plus :func:`load_cohort`, which reads each pair folder of ``voxreg register-batch``
(``metrics.json`` and ``affine.txt`` through :mod:`voxreg.io`). The rules:

- **relative to the cohort** (robust, so that a cohort of 6 works and the failures themselves
  do not shift the reference): mean Dice and NCC after registration far *below* the cohort,
  SD of log J far *above* it. "Far" is a modified z-score (Iglewicz & Hoaglin: ``(x - median)
  / (1.4826 MAD)``) beyond ``z`` = 3.5 **and** a difference beyond an absolute floor (Dice 0.05,
  NCC 0.05, SD log J 0.1), so that the normal spread of good pairs, even when that spread is
  tiny, is not flagged. Used only when at least ``min_cohort`` pairs have the value.
- **absolute**: folding (voxels with Jacobian <= 0) above 0.5 %; an affine with a reflection
  (determinant < 0), a singular value outside [0.6, 1.6] (extreme scaling), or a shear
  (upper-triangular factor of ``A = QR``, ITK's scale-shear order) above 0.3; a failed pair.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxreg.core.errors import VoxregError

__all__ = [
    "QCThresholds",
    "affine_geometry",
    "affine_reasons",
    "cohort_limit",
    "flag_cohort",
    "load_cohort",
    "pair_values",
    "robust_center",
]

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass(frozen=True)
class QCThresholds:
    """Limits of the QC rules (see the module docstring)."""

    z: float = 3.5
    dice_floor: float = 0.05
    ncc_floor: float = 0.05
    sdlogj_floor: float = 0.1
    min_cohort: int = 5
    folding_percent: float = 0.5
    singular_range: tuple[float, float] = (0.6, 1.6)
    shear: float = 0.3


# --------------------------------------------------------------------------- per-pair values


def _number(value: Any) -> float | None:
    """``value`` as a finite float, else None (JSON null, '', NaN, text)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def pair_values(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The QC values of one ``metrics.json`` payload: ``dice`` (mean after), ``ncc_before``
    (raw scans, before any alignment; else before the deformable stage), ``ncc_after``,
    ``folding_percent``, ``sdlogj``, ``engine``, ``seconds`` (None where absent)."""
    similarity = metrics.get("similarity") or {}
    before = similarity.get("ncc_raw", similarity.get("ncc_before"))
    return {
        "dice": _number(metrics.get("dice_mean_after")),
        "ncc_before": _number(before),
        "ncc_after": _number(similarity.get("ncc_after")),
        "folding_percent": _number(metrics.get("folding_percent")),
        "sdlogj": _number(metrics.get("log_jacobian_std")),
        "engine": metrics.get("engine") or "",
        "seconds": _number(metrics.get("total_seconds")),
    }


# --------------------------------------------------------------------------- affine


def affine_geometry(matrix: np.ndarray) -> dict[str, Any]:
    """Determinant, singular values and largest shear of the linear part of a 4x4 (3x3 in
    2D) affine: shear is the largest off-diagonal of ``R`` in ``A = QR`` divided by its row's
    diagonal (0 for any rotation with scaling along the axes)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] not in (3, 4):
        raise VoxregError(f"affine: expected a 3x3 or 4x4 matrix, got shape {matrix.shape}")
    linear = matrix[:-1, :-1]
    upper = np.linalg.qr(linear)[1]
    diagonal = np.abs(np.diag(upper))
    if np.any(diagonal < 1e-9):
        shear = float("inf")
    else:
        shear = float(np.max(np.abs(np.triu(upper, 1)) / diagonal[:, None], initial=0.0))
    return {
        "determinant": float(np.linalg.det(linear)),
        "singular_values": [float(v) for v in np.linalg.svd(linear, compute_uv=False)],
        "shear": shear,
    }


def affine_reasons(matrix: np.ndarray | None, thresholds: QCThresholds = QCThresholds()) -> list[str]:
    """Reasons to distrust an affine stage: reflection, extreme scaling, shear (none for None)."""
    if matrix is None:
        return []
    geometry = affine_geometry(matrix)
    reasons = []
    if geometry["determinant"] < 0:
        reasons.append(f"affine has a reflection (determinant {geometry['determinant']:.2f})")
    low, high = thresholds.singular_range
    outside = [v for v in geometry["singular_values"] if not low <= v <= high]
    if outside:
        values = ", ".join(f"{v:.2f}" for v in geometry["singular_values"])
        reasons.append(f"affine scaling extreme (singular values {values}; allowed {low}-{high})")
    if geometry["shear"] > thresholds.shear:
        reasons.append(f"affine shear {geometry['shear']:.2f} > {thresholds.shear}")
    return reasons


# --------------------------------------------------------------------------- cohort rules


def robust_center(values: Sequence[float]) -> tuple[float, float]:
    """(median, robust standard deviation = 1.4826 * median absolute deviation) of ``values``."""
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if array.size == 0:
        raise VoxregError("robust statistics need at least one value")
    median = float(np.median(array))
    return median, MAD_TO_SIGMA * float(np.median(np.abs(array - median)))


def cohort_limit(
    values: Sequence[float | None], floor: float, side: str, thresholds: QCThresholds = QCThresholds()
) -> float | None:
    """The value beyond which a pair is an outlier: ``median -/+ max(z * robust sd, floor)``
    for ``side`` 'low'/'high'; None when fewer than ``min_cohort`` values are known."""
    if side not in ("low", "high"):
        raise VoxregError(f"side must be 'low' or 'high', got {side!r}")
    known = [v for v in values if v is not None]
    if len(known) < thresholds.min_cohort:
        return None
    median, sd = robust_center(known)
    margin = max(thresholds.z * sd, floor)
    return median - margin if side == "low" else median + margin


_RELATIVE = (  # (value key, label, side, floor attribute, number format)
    ("dice", "Dice", "low", "dice_floor", ".3f"),
    ("ncc_after", "NCC after", "low", "ncc_floor", ".3f"),
    ("sdlogj", "SD log J", "high", "sdlogj_floor", ".3f"),
)


def cohort_limits(pairs: Mapping[str, Mapping[str, Any]], thresholds: QCThresholds = QCThresholds()) -> dict[str, Any]:
    """The cohort's outlier limits per value key (None where the cohort is too small),
    from the pairs whose registration ran (status not failed/pending)."""
    usable = [values for values in pairs.values() if values.get("status", "ok") in ("ok", "skipped")]
    return {
        key: cohort_limit([v.get(key) for v in usable], getattr(thresholds, floor), side, thresholds)
        for key, _, side, floor, _ in _RELATIVE
    }


def pair_reasons(
    values: Mapping[str, Any], limits: Mapping[str, Any], thresholds: QCThresholds = QCThresholds()
) -> list[str]:
    """Why one pair probably failed (empty: no flag), given the cohort ``limits``."""
    status = values.get("status", "ok")
    if status == "failed":
        return ["registration failed"]
    if status not in ("ok", "skipped"):
        return []
    reasons = []
    for key, label, side, _, fmt in _RELATIVE:
        value, limit = values.get(key), limits.get(key)
        if value is None or limit is None:
            continue
        if (side == "low" and value < limit) or (side == "high" and value > limit):
            word = "below" if side == "low" else "above"
            reasons.append(f"{label} {value:{fmt}} far {word} the cohort (limit {limit:{fmt}})")
    folding = values.get("folding_percent")
    if folding is not None and folding > thresholds.folding_percent:
        reasons.append(f"folding {folding:.2f}% > {thresholds.folding_percent}%")
    return reasons + affine_reasons(values.get("affine"), thresholds)


def flag_cohort(
    pairs: Mapping[str, Mapping[str, Any]], thresholds: QCThresholds = QCThresholds()
) -> dict[str, list[str]]:
    """Reasons per pair id (an empty list: not flagged). Each pair is a dict of
    :func:`pair_values` keys, optionally ``status`` (ok, skipped, failed, pending) and
    ``affine`` (4x4 world matrix or None)."""
    limits = cohort_limits(pairs, thresholds)
    return {pair_id: pair_reasons(values, limits, thresholds) for pair_id, values in pairs.items()}


# --------------------------------------------------------------------------- files


def _read_metrics(folder: Path) -> dict[str, Any] | None:
    """``folder/metrics.json`` as a dict (None when absent or unreadable)."""
    try:
        payload = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def _read_affine(folder: Path) -> np.ndarray | None:
    """The affine stage of ``folder/affine.txt`` as a 4x4 RAS matrix (None when absent)."""
    from voxreg import io

    path = folder / "affine.txt"
    return io.read_itk_affine(path) if path.is_file() else None


def load_cohort(outdir: str | Path, rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """QC values per pair of a ``register-batch`` output folder: ``rows`` of batch.csv (id,
    status, error, seconds...), each completed with :func:`pair_values` of ``<id>/metrics.json``
    and ``affine`` from ``<id>/affine.txt``. A pair whose folder has no metrics keeps its row."""
    outdir = Path(outdir)
    cohort: dict[str, dict[str, Any]] = {}
    for row in rows:
        pair_id = str(row.get("id", ""))
        values: dict[str, Any] = {"status": row.get("status") or "ok", "error": row.get("error") or ""}
        metrics = _read_metrics(outdir / pair_id) if values["status"] in ("ok", "skipped") else None
        if metrics is not None:
            values.update(pair_values(metrics))
            values["affine"] = _read_affine(outdir / pair_id)
        values["seconds"] = _number(row.get("seconds")) or values.get("seconds")  # a skipped pair: its first run
        cohort[pair_id] = values
    return cohort
