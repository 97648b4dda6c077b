"""``voxreg preprocess``: bring raw scans into one atlas space for training."""

from __future__ import annotations

from pathlib import Path

import typer

from voxreg.cli.progress import console, progress_bar, user_errors
from voxreg.core.errors import VoxregError

__all__ = ["preprocess"]


@user_errors
def preprocess(
    scans: list[Path] = typer.Argument(..., help="Raw scans (files or DICOM folders)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    atlas: str = typer.Option(
        "mni152", "--atlas", help="Atlas file, or 'mni152' (template shipped in the nilearn wheel)."
    ),
    labels: list[Path] = typer.Option([], "--labels", help="Label map per scan, in the same order as SCANS."),
    mask_labels: bool = typer.Option(
        False, "--mask-labels", help="Zero intensities outside the label map (brain/organ mask)."
    ),
    spacing: float | None = typer.Option(
        None, "--spacing", help="Voxel size of the output grid in mm (default: the atlas')."
    ),
    multiple: int = typer.Option(16, "--multiple", help="Crop/pad each axis to a multiple of this."),
    window: tuple[float, float] | None = typer.Option(
        None, "--window", help="Intensity window, e.g. CT HU: --window -200 300."
    ),
    similarity: str = typer.Option("ncc", "--similarity", help="Affine similarity: ncc or mi."),
) -> None:
    """Bring raw scans into one atlas space for training: affine alignment, a network-friendly
    grid, intensity normalisation; writes the scans, manifest.csv and summary.png."""
    from voxreg.training.preprocess import preprocess as run_preprocess

    if labels and len(labels) != len(scans):
        raise VoxregError(f"--labels was given {len(labels)} times for {len(scans)} scans: give one per scan")
    with progress_bar("preprocessing") as update:
        result = run_preprocess(
            scans,
            output,
            atlas=atlas,
            labels=labels or None,
            mask_labels=mask_labels,
            spacing=spacing,
            multiple=multiple,
            window=window,
            similarity=similarity,
            progress=update,
        )
    failed = [r for r in result.outputs if r.status != "ok"]
    console.print(
        f"{len(result.outputs) - len(failed)} of {len(result.outputs)} scans on grid {result.grid.shape} -> {output}"
    )
    for record in failed:
        error = record.error if record.error.startswith(str(record.source)) else f"{record.source}: {record.error}"
        console.print(f"  failed: {error}", markup=False, highlight=False)
    console.print(f"  manifest {result.manifest}\n  summary  {result.summary}")
