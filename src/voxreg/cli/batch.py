"""``voxreg register-batch``: many pairs from a CSV, one model load, resumable, torchrun-ready."""

from __future__ import annotations

from pathlib import Path

import typer

from voxreg.cli.options import Engine, Lambda, Model, NoInverse, NoItk, Passes, Refine, Similarity
from voxreg.cli.progress import console, progress_bar, user_errors


@user_errors
def register_batch(
    pairs: Path = typer.Argument(
        ..., help="CSV with columns fixed,moving[,fixed_labels,moving_labels][,id] (paths relative to the CSV)."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder: one sub-folder per pair id, batch.csv."),
    model: Model = None,
    engine: Engine = "auto",
    similarity: Similarity = "ncc",
    lam: Lambda = None,
    refine: Refine = None,
    passes: Passes = None,
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N] (under torchrun: one GPU per rank)."),
    workers: int = typer.Option(2, "--workers", help="IO threads reading ahead / writing behind (0: none)."),
    no_affine: bool = typer.Option(False, "--no-affine", help="Skip the affine pre-alignment."),
    affine_only: bool = typer.Option(False, "--affine-only", help="Stop after the affine pre-alignment."),
    no_figure: bool = typer.Option(False, "--no-figure", help="Skip figure.png."),
    no_inverse: NoInverse = False,
    no_itk: NoItk = False,
    no_report: bool = typer.Option(
        False, "--no-report", help="Skip the cohort QC report (report.html, qc_flag/qc_reasons in batch.csv)."
    ),
) -> None:
    """Register every pair of PAIRS into OUTPUT/<id>/ (the outputs of voxreg register), loading
    the model once. Finished pairs are skipped, so a rerun resumes; a failing pair is recorded
    in OUTPUT/batch.csv and the others go on (exit 2 if any failed). Under torchrun each rank
    takes every WORLD_SIZE-th pair. OUTPUT/report.html shows every pair (thumbnail, Dice, NCC,
    folding, SD log J) and flags the ones that probably failed (also qc_flag/qc_reasons in batch.csv)."""
    from voxreg.cohort.report import write_report_quietly
    from voxreg.registration.batch import run_batch
    from voxreg.registration.outputs import OutputFiles

    with progress_bar("pairs") as update:
        summary = run_batch(
            pairs,
            output,
            model=model,
            engine=engine,
            device=device,
            workers=workers,
            figure=not no_figure,
            files=OutputFiles(inverse=not no_inverse, itk=not no_itk),
            progress=update,
            similarity=similarity,
            lam=lam,
            refine=refine,
            passes=passes,
            affine=not no_affine,
            affine_only=affine_only,
            on_merged=None if no_report else write_report_quietly,
        )
    console.print(summary.line())
    if summary.merged is not None:
        console.print(summary.merged if isinstance(summary.merged, str) else summary.merged.line())
    for row in summary.rows:
        if row["status"] == "failed":
            console.print(f"  failed {row['id']}: {row['error']}")
    if summary.failed:
        raise typer.Exit(code=2)
