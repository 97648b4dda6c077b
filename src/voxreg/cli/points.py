"""``voxreg transform-points``: map an ANTs points CSV through a saved registration."""

from __future__ import annotations

from pathlib import Path

import typer

from voxreg.cli.progress import console, user_errors

__all__ = ["transform_points"]


@user_errors
def transform_points(
    folder: Path = typer.Argument(..., help="Output folder of voxreg register (field.nii.gz, affine.txt)."),
    points: Path = typer.Argument(..., help="Points CSV as antsApplyTransformsToPoints reads it: x,y,z,t in LPS mm."),
    output: Path = typer.Option(..., "-o", "--output", help="Output CSV (same columns, mapped coordinates)."),
    inverse: bool = typer.Option(False, "--inverse", help="Map moving-scan points back into the fixed scan."),
    ras: bool = typer.Option(False, "--ras", help="Read and write RAS millimetres instead of LPS."),
) -> None:
    """Map points from the fixed scan's space to where they are in the moving scan (the
    direction antsApplyTransformsToPoints uses with the forward transforms), or back with
    --inverse. Columns other than x,y,z are kept."""
    from voxreg.cohort.points import transform_points_csv
    from voxreg.io.staging import Terminated, staged_outputs

    folder_out = output.parent if str(output.parent) else Path(".")
    try:
        with staged_outputs(folder_out, [points, folder / "field.nii.gz"], outputs=(output.name,), lock=False) as stage:
            _, count = transform_points_csv(folder, points, stage / output.name, inverse=inverse, ras=ras)
    except Terminated:
        typer.echo("voxreg: terminated; no output written", err=True)
        raise typer.Exit(code=143) from None
    direction = "moving -> fixed" if inverse else "fixed -> moving"
    console.print(f"mapped {count} points ({direction}, {'RAS' if ras else 'LPS'} mm); wrote {output}")
