"""The registration pairs the suites share (moving -> fixed), from ``../shared/data``.

The data is research data (see its README.md): it is read in place, never copied into the
repository. Every function here only builds paths (or, for the synthetic pairs, writes
inputs into a folder the caller gives); a suite checks :func:`data_root` exists first.

- Mindboggle OASIS-TRT-20, 8 disjoint pairs 2->1, 4->3, ..., 16->15: native 1 mm T1w scans
  (256x256x160, not aligned) with manual DKT31+CMA labels; Dice over the labels present in
  both maps, 0 and the stray 74 excluded (:func:`mean_dice`).
- the MNI152 demo pair: the template (nilearn wheel) against a known smooth deformation of
  itself (``voxreg demo``'s inputs, :func:`write_demo_pair`).
- 2D pairs: ANTs slices r64->r16, r85->r27, OASIS 2D B->A, ITKElastix CT head (masks).
- CT: the TotalSegmentator example CT (3 mm, HU) and its organ labels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voxreg.registration.batch import BatchPair

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
MINDBOGGLE_PAIRS: tuple[tuple[int, int], ...] = tuple((2 * k, 2 * k - 1) for k in range(1, 9))
EXCLUDED_LABELS = frozenset({0, 74})


@dataclass(frozen=True)
class Pair(BatchPair):
    """One registration pair (register-batch's :class:`BatchPair`): ``moving`` is registered
    onto ``fixed``; labels optional."""

    def exists(self) -> bool:
        """True when every file of the pair is present."""
        return all(p.exists() for p in (self.fixed, self.moving, self.fixed_labels, self.moving_labels) if p)

    def csv_row(self) -> dict[str, str]:
        """The pair as a row of a ``voxreg evaluate`` / ``register-batch`` pairs CSV."""
        row = {"id": self.id, "fixed": str(self.fixed), "moving": str(self.moving)}
        if self.fixed_labels and self.moving_labels:
            row.update(fixed_labels=str(self.fixed_labels), moving_labels=str(self.moving_labels))
        return row


def data_root(path: str | Path | None = None) -> Path:
    """The shared data folder: ``path``, else ``$VOXREG_BENCH_DATA``, else ``../shared/data``."""
    return Path(path or os.environ.get("VOXREG_BENCH_DATA") or DEFAULT_DATA)


def mindboggle_subject(number: int, data: Path | None = None) -> tuple[Path, Path]:
    """Brain scan and manual DKT31+CMA label map of OASIS-TRT-20-<number>."""
    folder = data_root(data) / "brain_mri" / "mindboggle_oasis_trt20" / f"OASIS-TRT-20-{number}"
    return folder / "t1weighted_brain.nii.gz", folder / "labels_DKT31_CMA.nii.gz"


def mindboggle_pairs(count: int | None = None, data: Path | None = None) -> list[Pair]:
    """The first ``count`` (default all 8) held-out Mindboggle pairs 2->1, 4->3, ..., 16->15."""
    pairs = []
    for moving_id, fixed_id in MINDBOGGLE_PAIRS[:count]:
        (fixed, fixed_labels), (moving, moving_labels) = (
            mindboggle_subject(fixed_id, data),
            mindboggle_subject(moving_id, data),
        )
        pairs.append(Pair(f"{moving_id}->{fixed_id}", fixed, moving, fixed_labels, moving_labels))
    return pairs


def parse_pairs(texts: list[str], data: Path | None = None) -> list[Pair]:
    """Mindboggle pairs from ``"moving:fixed"`` subject numbers, e.g. ``["2:1", "4:3"]``."""
    pairs = []
    for text in texts:
        moving_id, fixed_id = (int(v) for v in text.split(":"))
        (fixed, fixed_labels), (moving, moving_labels) = (
            mindboggle_subject(fixed_id, data),
            mindboggle_subject(moving_id, data),
        )
        pairs.append(Pair(f"{moving_id}->{fixed_id}", fixed, moving, fixed_labels, moving_labels))
    return pairs


def mean_dice(fixed_labels: Any, warped_labels: Any, excluded: frozenset[int] = EXCLUDED_LABELS) -> float:
    """Mean Dice over the labels present in both maps, without ``excluded`` (0 and 74)."""
    import numpy as np

    from voxreg import metrics

    labels = sorted((set(np.unique(fixed_labels)) & set(np.unique(warped_labels))) - set(excluded))
    return float(np.nanmean(list(metrics.dice_per_label(fixed_labels, warped_labels, labels).values())))


def two_d_pairs(data: Path | None = None) -> list[Pair]:
    """The 2D pairs: ANTs slices r64->r16 and r85->r27, OASIS 2D B->A, CT head (masks as labels)."""
    root = data_root(data)
    slices, ct = root / "brain_2d" / "antspy_slices", root / "ct_2d" / "itkelastix_ct2d_head"
    oasis = root / "brain_2d" / "oasis_2d_pair"
    return [
        Pair("r64->r16", slices / "r16slice.nii.gz", slices / "r64slice.nii.gz"),
        Pair("r85->r27", slices / "r27slice.nii.gz", slices / "r85slice.nii.gz"),
        Pair("oasis2d B->A", oasis / "image_A_2D.nii.gz", oasis / "image_B_2D.nii.gz"),
        Pair(
            "CT head moving->fixed",
            ct / "CT_2D_head_fixed.nii.gz",
            ct / "CT_2D_head_moving.nii.gz",
            ct / "CT_2D_head_fixed_mask.nii.gz",
            ct / "CT_2D_head_moving_mask.nii.gz",
        ),
    ]


def ct_scan(data: Path | None = None) -> tuple[Path, Path, Path]:
    """TotalSegmentator example CT (3 mm, HU), its organ label map and labels.csv."""
    folder = data_root(data) / "ct" / "totalsegmentator_example"
    return folder / "example_ct.nii.gz", folder / "example_seg.nii.gz", folder / "labels.csv"


def brain_templates(data: Path | None = None) -> dict[str, Path]:
    """MNI152 1 mm and Colin27 (ANTsPy data) and the C2FViT OASIS pair (256^3, unaligned)."""
    root = data_root(data) / "brain_mri"
    return {
        "mni": root / "templates_antspy" / "mni.nii.gz",
        "colin27": root / "templates_antspy" / "ch2.nii.gz",
        "c2fvit_a": root / "c2fvit_oasis_native" / "image_A.nii.gz",
        "c2fvit_b": root / "c2fvit_oasis_native" / "image_B.nii.gz",
    }


def write_demo_pair(folder: Path, resolution_mm: int = 2, max_displacement: float = 5.0) -> Pair:
    """Write the MNI152 demo pair (``voxreg demo``'s inputs: the template vs a known smooth
    deformation of itself with an intensity change, tissue labels) into ``folder``."""
    from voxreg.cli.demo import write_demo_inputs

    paths, _, _ = write_demo_inputs(Path(folder), resolution_mm, max_displacement)
    return Pair(
        f"MNI152 {resolution_mm} mm demo",
        paths["fixed"],
        paths["moving"],
        paths["fixed_labels"],
        paths["moving_labels"],
    )


def write_pairs_csv(path: Path, pairs: list[Pair] | list[dict[str, str]], all_columns: bool = False) -> Path:
    """A pairs CSV for ``voxreg register-batch`` (the columns in use) or, with ``all_columns``,
    for ``voxreg evaluate`` (id, fixed, moving, labels and landmarks, empty where absent)."""
    import csv

    rows = [p.csv_row() if isinstance(p, Pair) else p for p in pairs]
    columns = ["id", "fixed", "moving", "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks"]
    used = columns if all_columns else [c for c in columns if any(row.get(c) for row in rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=used, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: str(v) for k, v in row.items()} for row in rows)
    return path
