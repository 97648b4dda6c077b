"""``voxreg evaluate`` and ``voxreg tune-lambda``: thin commands over
:func:`voxreg.evaluation.runner.evaluate` and :func:`voxreg.evaluation.tune.tune_lambda`.
A bad value is one line on stderr, exit 2."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from voxreg.cli.options import Device
from voxreg.cli.progress import console, progress_bar, user_errors
from voxreg.core.errors import VoxregError

__all__ = ["evaluate", "tune_lambda"]


def _float_list(option: str, text: str) -> list[float]:
    """``"0.1,1,10"`` -> ``[0.1, 1.0, 10.0]``; VoxregError naming the option otherwise."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VoxregError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise VoxregError(f"{option} takes comma-separated numbers, got {text!r}")
    return values


def _check_number(option: str, value: float | None, low: float, low_inclusive: bool = True) -> None:
    """Refuse NaN, Inf and values below ``low`` (or at it when not ``low_inclusive``)."""
    if value is None:
        return
    ok = math.isfinite(value) and (value >= low if low_inclusive else value > low)
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low:g}"
        raise VoxregError(f"{option} must be a finite number {bound}, got {value:g}")


def _check_int(option: str, value: int | None, low: int) -> None:
    """Refuse an integer option below ``low``."""
    if value is not None and value < low:
        raise VoxregError(f"{option} must be an integer >= {low}, got {value}")


def _int_list(text: str, option: str) -> list[int]:
    """Integers of a comma list such as ``0,74`` (VoxregError naming ``option`` otherwise)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VoxregError(f"{option} must be a comma list of integers, got {text!r}") from None


@user_errors
def tune_lambda(
    model: Path = typer.Argument(..., help="Lambda-conditional checkpoint (voxreg train --lambda-range)."),
    val: list[str] = typer.Argument(
        ..., help="Validation scans with labels: a CSV of scan,labels rows (pairs as in training)."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for lambda_curve.csv and lambda_curve.png."),
    lambdas: str | None = typer.Option(
        None, "--lambdas", help="Comma-separated values (default: log grid over the trained range)."
    ),
    num: int = typer.Option(9, "--num", help="Number of log-spaced values when --lambdas is not given."),
    max_folding: float = typer.Option(
        0.5, "--max-folding", help="Largest acceptable mean % of voxels with det J <= 0."
    ),
    exclude: str = typer.Option("0", "--exclude-labels", help="Label codes not scored (comma-separated)."),
    device: Device = "auto",
) -> None:
    """Sweep lambda of a lambda-conditional model on validation pairs: Dice and % folding
    against lambda (CSV + PNG) and the recommended value."""
    from voxreg.evaluation.tune import tune_lambda as sweep
    from voxreg.training import trainer as training

    values = _float_list("--lambdas", lambdas) if lambdas else None
    for value in values or []:
        _check_number("--lambdas", value, 0.0, low_inclusive=False)
    _check_int("--num", num, 2)
    _check_number("--max-folding", max_folding, 0.0)
    excluded = _int_list(exclude, "--exclude-labels")
    scans, labels = training.scan_list(val)
    data = training.TrainingSet.from_paths(scans, labels)
    with progress_bar("lambda sweep") as update:
        result = sweep(
            model,
            data,
            output,
            values,
            num=num,
            max_folding=max_folding,
            device=device,
            exclude=excluded,
            progress=update,
        )
    console.print("lambda    Dice (std)       folding %  SD logJ")
    for p in result.points:
        console.print(
            f"{p.lam:<9.4g} {p.dice_mean:.3f} ({p.dice_std:.3f})   {p.folding_percent:8.3f}  {p.log_jacobian_std:.3f}"
        )
    console.print(f"recommended lambda: {result.recommended:.4g} ({result.reason})")
    console.print(f"  curve {result.csv}\n  plot  {result.plot}")


@user_errors
def evaluate(
    pairs: Path = typer.Argument(
        ...,
        help="CSV with header fixed,moving[,fixed_labels,moving_labels,fixed_landmarks,moving_landmarks,id]; relative paths from its folder.",
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Output folder: results.csv, per_structure.csv, examples/."
    ),
    methods: str | None = typer.Option(
        None,
        "--methods",
        help="Comma list of affine, default, instance, network, network-refine, ants-syn (default affine,ants-syn,instance, + network,network-refine with --model). default = voxreg register with no options.",
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Network checkpoint, or a shipped model's name, for network / network-refine."
    ),
    refine: int | None = typer.Option(
        None,
        "--refine",
        help="Refinement steps of network-refine (default: the shipped model's own; 50 after a checkpoint).",
    ),
    passes: int | None = typer.Option(
        None,
        "--passes",
        help="Network passes of network / network-refine (a cascade; default: the shipped model's own, 1 after a checkpoint).",
    ),
    lam: float | None = typer.Option(
        None, "--lambda", "-l", help="Regularisation weight (instance, refinement, lambda-conditional network)."
    ),
    similarity: str = typer.Option(
        "ncc", "--similarity", "-s", help="Instance-optimisation similarity: ncc, mse or mi."
    ),
    iterations: str | None = typer.Option(
        None,
        "--iterations",
        help="Instance-optimisation Adam steps per pyramid level, coarse to fine (default 100,60,10).",
    ),
    device: Device = "auto",
    structures: str = typer.Option(
        "all",
        "--structures",
        help="Labels scored: all (present in both maps), a preset (aseg30, dkt31) or a label table file (LUT or code,name CSV) giving names.",
    ),
    exclude_labels: str = typer.Option(
        "0", "--exclude-labels", help="Comma list of labels left out of Dice/HD95 (Mindboggle: 0,74)."
    ),
    ants_threads: int | None = typer.Option(
        None, "--ants-threads", help="ITK threads for ANTs SyN (default: all CPU cores)."
    ),
    examples: int = typer.Option(2, "--examples", help="Write example slices for the first N pairs."),
) -> None:
    """Run several registration methods (voxreg and ANTs SyN) over PAIRS and record Dice, HD95,
    folding, SD log-Jacobian, NCC/MI, TRE, runtime and memory; rerunning resumes."""
    from voxreg.evaluation.runner import describe_row
    from voxreg.evaluation.runner import evaluate as run_evaluation

    iteration_list = _int_list(iterations, "--iterations") if iterations else None
    if iteration_list is not None and (min(iteration_list, default=-1) < 0 or sum(iteration_list) < 1):
        raise VoxregError(f"--iterations takes steps >= 0 per level (at least one > 0), got {iterations!r}")
    _check_number("--lambda", lam, 0.0)
    _check_int("--refine", refine, 1)
    _check_int("--passes", passes, 1)
    _check_int("--examples", examples, 0)
    _check_int("--ants-threads", ants_threads, 1)
    excluded = _int_list(exclude_labels, "--exclude-labels")
    with progress_bar("evaluating") as update:
        result = run_evaluation(
            pairs,
            output,
            methods,
            model=model,
            refine=refine,
            passes=passes,
            lam=lam,
            similarity=similarity,
            device=device,
            structures=structures,
            exclude_labels=excluded,
            ants_threads=ants_threads,
            examples=examples,
            iterations=iteration_list,
            progress=lambda done, total, row: update(done, total, describe_row(row)),
        )
    console.print(f"{result.ran} run, {result.skipped} already done, {result.failed} failed -> {result.outdir}")
    for row in result.rows:
        if row.get("status") != "ok":
            console.print(f"  failed: {row.get('id')} {row.get('method')}: {row.get('error')}")
    console.print(f"  results       {result.results_csv}\n  per structure {result.per_structure_csv}")
    for name, path in result.report.items():
        console.print(f"  {name:13s} {path}")
    for warning in result.warnings:
        console.print(f"  warning: {warning}")
