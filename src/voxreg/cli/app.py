"""Command-line interface: thin typer commands over the registration, training and evaluation layers.

Every user error (:class:`voxreg.errors.VoxregError`) is printed as one line on stderr
and exits with code 2, without a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer
from voxreg.cli.progress import console, progress_bar, user_errors
from voxreg.core.errors import VoxregError

Device = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda[:N].")]

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="voxreg: deformable registration of 3D/2D medical images.")


@app.command()
@user_errors
def register(
    fixed: Path = typer.Argument(..., help="Fixed (reference) scan."),
    moving: Path = typer.Argument(..., help="Moving scan, warped onto the fixed one."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Network checkpoint; without it instance optimisation runs."),
    similarity: str = typer.Option("ncc", "--similarity", "-s", help="Similarity: ncc, mse or mi."),
    lam: Optional[float] = typer.Option(None, "--lambda", "-l", help="Regularisation weight."),
    refine: int = typer.Option(0, "--refine", help="Instance-optimisation steps after the network."),
    device: Device = "auto",
    moving_labels: list[Path] = typer.Option([], "--moving-labels", help="Label map(s) on the moving scan to carry along."),
    fixed_labels: Optional[Path] = typer.Option(None, "--fixed-labels", help="Label map of the fixed scan (for Dice)."),
    no_affine: bool = typer.Option(False, "--no-affine", help="Skip the affine pre-alignment (scans already aligned)."),
    affine_only: bool = typer.Option(False, "--affine-only", help="Stop after the affine pre-alignment."),
    no_figure: bool = typer.Option(False, "--no-figure", help="Skip figure.png."),
) -> None:
    """Register MOVING to FIXED (affine, then deformable) and write warped image, labels,
    fields (voxreg + ITK/ANTs), affine.txt, metrics.json and figure.png."""
    from voxreg import io
    from voxreg.registration import pipeline as api

    io.ensure_output_dir(output)
    with progress_bar("registering") as update:
        result = api.register(fixed, moving, model=model, similarity=similarity, lam=lam, refine=refine,
                              device=device, moving_labels=moving_labels or None, fixed_labels=fixed_labels,
                              affine=not no_affine, affine_only=affine_only, progress=update)
    written = result.save(output, figure=not no_figure)
    _print_summary(result.metrics, written)


def _print_summary(values: dict, written: dict[str, Path]) -> None:
    sim = values.get("similarity", {})
    line = (f"{values['engine']} on {values['device']}: {values['registration_seconds']:.2f} s, "
            f"folding {values['folding_percent']:.3f}%")
    if "ncc_before" in sim:
        line += f", NCC {sim['ncc_before']:.3f} -> {sim['ncc_after']:.3f}"
    if "dice_mean_after" in values:
        stages = [f"{values['dice_mean_before']:.3f}"]
        if "dice_mean_affine" in values and values["engine"] != "affine":
            stages.append(f"{values['dice_mean_affine']:.3f} (affine)")
        stages.append(f"{values['dice_mean_after']:.3f}")
        line += ", mean Dice " + " -> ".join(stages)
    console.print(line)
    for name, path in written.items():
        console.print(f"  {name:14s} {path}")


@app.command()
@user_errors
def warp(
    field: Path = typer.Argument(..., help="field.nii.gz written by voxreg register."),
    image: Path = typer.Argument(..., help="Image or label map on the moving scan's grid."),
    output: Path = typer.Option(..., "-o", "--output", help="Output file (.nii.gz, .nrrd, ...)."),
    nearest: bool = typer.Option(False, "--nearest", help="Nearest-neighbour (label maps)."),
    affine: Optional[Path] = typer.Option(None, "--affine", help="ITK affine text (default: affine.txt next to FIELD, if any)."),
    no_affine: bool = typer.Option(False, "--no-affine", help="Ignore affine.txt next to FIELD."),
    device: Device = "auto",
) -> None:
    """Apply a saved displacement FIELD (and the affine.txt beside it) to IMAGE."""
    from voxreg import io
    from voxreg.registration import pipeline as api

    io.ensure_output_dir(output.parent if str(output.parent) else Path("."))
    if affine is None and not no_affine and (field.parent / "affine.txt").exists():
        affine = field.parent / "affine.txt"
        console.print(f"applying {affine} then {field.name} (composite of voxreg register)")
    warped = api.apply_field(field, image, nearest=nearest or None, affine_path=affine, device=device)
    io.save_image(warped, output)
    console.print(f"wrote {output}")


@app.command()
@user_errors
def preprocess(
    scans: list[Path] = typer.Argument(..., help="Raw scans (files or DICOM folders)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    atlas: str = typer.Option("mni152", "--atlas", help="Atlas file, or 'mni152' (template shipped in the nilearn wheel)."),
    labels: list[Path] = typer.Option([], "--labels", help="Label map per scan, in the same order as SCANS."),
    mask_labels: bool = typer.Option(False, "--mask-labels", help="Zero intensities outside the label map (brain/organ mask)."),
    spacing: Optional[float] = typer.Option(None, "--spacing", help="Voxel size of the output grid in mm (default: the atlas')."),
    multiple: int = typer.Option(16, "--multiple", help="Crop/pad each axis to a multiple of this."),
    window: Optional[tuple[float, float]] = typer.Option(None, "--window", help="Intensity window, e.g. CT HU: --window -200 300."),
    similarity: str = typer.Option("ncc", "--similarity", help="Affine similarity: ncc or mi."),
) -> None:
    """Bring raw scans into one atlas space for training: affine alignment, a network-friendly
    grid, intensity normalisation; writes the scans, manifest.csv and summary.png."""
    from voxreg.training.preprocess import preprocess as run_preprocess

    if labels and len(labels) != len(scans):
        raise VoxregError(f"--labels was given {len(labels)} times for {len(scans)} scans: give one per scan")
    with progress_bar("preprocessing") as update:
        result = run_preprocess(scans, output, atlas=atlas, labels=labels or None, mask_labels=mask_labels,
                                spacing=spacing, multiple=multiple, window=window, similarity=similarity,
                                progress=update)
    failed = [r for r in result.outputs if r.status != "ok"]
    console.print(f"{len(result.outputs) - len(failed)} of {len(result.outputs)} scans on grid "
                  f"{result.grid.shape} -> {output}")
    for record in failed:
        console.print(f"  failed: {record.source}: {record.error}")
    console.print(f"  manifest {result.manifest}\n  summary  {result.summary}")


def _parse_schedule(stages: list[str]) -> list[tuple[float, int]]:
    """``["0.5:1000", ...]`` -> ``[(0.5, 1000), ...]`` (ValueError on a malformed stage)."""
    out = []
    for stage in stages:
        scale, sep, steps = stage.partition(":")
        try:
            out.append((float(scale), int(steps)))
        except ValueError:
            raise ValueError(f"--schedule takes SCALE:STEPS (e.g. 0.5:1000), got {stage!r}") from None
        if not sep:
            raise ValueError(f"--schedule takes SCALE:STEPS (e.g. 0.5:1000), got {stage!r}")
    return out


def _train_info(row: dict[str, float]) -> str:
    """Loss (and the last validation Dice) for the training progress bar."""
    text = f"loss {row['loss']:.4f}"
    return text + (f" val Dice {row['val_dice']:.3f}" if "val_dice" in row else "")


@app.command()
@user_errors
def train(
    scans: list[str] = typer.Argument(..., help="Training scans: files, folders, globs or a CSV (scan[,labels])."),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder: checkpoints, metrics.csv, loss_curve.png."),
    val: list[str] = typer.Option([], "--val", help="Validation scans (same forms; a CSV can give label maps)."),
    similarity: str = typer.Option("ncc", "--similarity", "-s", help="ncc, mse or mi."),
    lam: float = typer.Option(1.0, "--lambda", "-l", help="Regularisation weight."),
    ncc_window: int = typer.Option(9, "--ncc-window", help="Local NCC window size (voxels)."),
    lam_range: Optional[tuple[float, float]] = typer.Option(None, "--lambda-range", help="Train one lambda-conditional model over [LO, HI]."),
    network: str = typer.Option("vm2", "--network", help="vm1 or vm2 feature sizes."),
    half_res: bool = typer.Option(False, "--half-res", help="Predict the field at half resolution (faster)."),
    int_steps: int = typer.Option(0, "--int-steps", help="Scaling-and-squaring steps (0 = plain displacement)."),
    steps: int = typer.Option(1000, "--steps", help="Optimiser steps."),
    lr: float = typer.Option(1e-4, "--lr", help="Adam learning rate."),
    batch_size: int = typer.Option(1, "--batch-size"),
    shape: Optional[tuple[int, int, int]] = typer.Option(None, "--shape", help="Resize every scan to this grid (3D)."),
    dice_weight: float = typer.Option(0.0, "--dice-weight", help="Semi-supervised Dice weight (needs label maps)."),
    augment: bool = typer.Option(False, "--augment", help="Small random affine + intensity augmentation."),
    atlas: Optional[Path] = typer.Option(None, "--atlas", help="Scan-to-atlas training: every pair is scan -> this atlas."),
    atlas_labels: Optional[Path] = typer.Option(None, "--atlas-labels", help="Label map of the atlas (semi-supervised)."),
    bidirectional: bool = typer.Option(False, "--bidirectional", help="Also score fixed warped by the inverse (needs --int-steps)."),
    schedule: list[str] = typer.Option([], "--schedule", help="Coarse-to-fine stage SCALE:STEPS (repeatable), e.g. 0.5:1000; then full resolution."),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="constant or cosine."),
    amp: bool = typer.Option(False, "--amp", help="Mixed precision on CUDA (bf16; fp16 + scaling where bf16 is unsupported)."),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint", help="Recompute activations: less memory for large volumes."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also log to OUTPUT/tensorboard (needs tensorboard)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache of the scans on the training grid (.pt), reused when the inputs match."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every"),
    validate_every: int = typer.Option(100, "--validate-every"),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUTPUT from last.pt."),
    device: Device = "auto",
) -> None:
    """Train a VoxelMorph network without labels (scan-to-scan pairs), on CPU or GPU."""
    from voxreg.training import trainer as training

    try:
        config = training.TrainConfig(similarity=similarity, window=ncc_window, lam=lam, lam_range=lam_range,
                                      network=network,
                                      half_res=half_res, int_steps=int_steps, steps=steps, lr=lr,
                                      batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every,
                                      validate_every=validate_every, device=device, dice_weight=dice_weight,
                                      augment=augment, bidirectional=bidirectional,
                                      schedule=_parse_schedule(schedule), lr_schedule=lr_schedule, amp=amp,
                                      grad_checkpoint=grad_checkpoint, tensorboard=tensorboard)
    except ValueError as exc:
        raise VoxregError(str(exc)) from None
    train_scans, train_labels = training.scan_list(scans)
    data = training.TrainingSet.from_paths(train_scans, train_labels, shape=shape, cache=cache,
                                           atlas=atlas, atlas_labels=atlas_labels)
    validation = None
    if val:
        val_scans, val_labels = training.scan_list(val)
        validation = training.TrainingSet.from_paths(val_scans, val_labels, shape=data.shape, atlas=atlas,
                                                     atlas_labels=atlas_labels)
    with progress_bar("training") as update:
        try:
            result = training.train(config, data, output, validation, resume=resume,
                                    progress=lambda step, row: update(step, config.steps, _train_info(row)))
        except training.TrainingInterrupted as stop:
            console.print(f"stopped at step {stop.step}; saved {stop.checkpoint} (continue with --resume)")
            raise typer.Exit(code=130) from None
    console.print(f"trained {result.step} steps -> {result.output_dir}")
    console.print(f"  last {result.last_checkpoint}\n  best {result.best_checkpoint}\n  metrics {result.metrics_csv}")


@app.command("tune-lambda")
@user_errors
def tune_lambda(
    model: Path = typer.Argument(..., help="Lambda-conditional checkpoint (voxreg train --lambda-range)."),
    val: list[str] = typer.Argument(..., help="Validation scans with labels: a CSV of scan,labels rows (pairs as in training)."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for lambda_curve.csv and lambda_curve.png."),
    lambdas: Optional[str] = typer.Option(None, "--lambdas", help="Comma-separated values (default: log grid over the trained range)."),
    num: int = typer.Option(9, "--num", help="Number of log-spaced values when --lambdas is not given."),
    max_folding: float = typer.Option(0.5, "--max-folding", help="Largest acceptable mean % of voxels with det J <= 0."),
    exclude: str = typer.Option("0", "--exclude-labels", help="Label codes not scored (comma-separated)."),
    device: Device = "auto",
) -> None:
    """Sweep lambda of a lambda-conditional model on validation pairs: Dice and % folding
    against lambda (CSV + PNG) and the recommended value."""
    from voxreg.training import trainer as training
    from voxreg.evaluation.tune import tune_lambda as sweep

    values = _float_list("--lambdas", lambdas) if lambdas else None
    scans, labels = training.scan_list(val)
    data = training.TrainingSet.from_paths(scans, labels)
    with progress_bar("lambda sweep") as update:
        result = sweep(model, data, output, values, num=num, max_folding=max_folding, device=device,
                       exclude=[int(v) for v in _float_list("--exclude-labels", exclude)], progress=update)
    console.print("lambda    Dice (std)       folding %  SD logJ")
    for p in result.points:
        console.print(f"{p.lam:<9.4g} {p.dice_mean:.3f} ({p.dice_std:.3f})   {p.folding_percent:8.3f}  {p.log_jacobian_std:.3f}")
    console.print(f"recommended lambda: {result.recommended:.4g} ({result.reason})")
    console.print(f"  curve {result.csv}\n  plot  {result.plot}")


def _float_list(option: str, text: str) -> list[float]:
    """``"0.1,1,10"`` -> ``[0.1, 1.0, 10.0]``; VoxregError naming the option otherwise."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VoxregError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise VoxregError(f"{option} takes comma-separated numbers, got {text!r}")
    return values


@app.command()
@user_errors
def demo(
    output: Path = typer.Option(Path("voxreg_demo_output"), "-o", "--output", help="Output folder."),
    device: Device = "auto",
    max_displacement: float = typer.Option(5.0, help="Largest displacement of the synthetic deformation (voxels)."),
) -> None:
    """Register the MNI152 template (nilearn wheel) to a known synthetic deformation of itself."""
    from voxreg.cli.demo import run_demo

    run_demo(output, device=device, max_displacement=max_displacement, console=console)


def _int_list(text: str, option: str) -> list[int]:
    """Integers of a comma list such as ``0,74`` (VoxregError naming ``option`` otherwise)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VoxregError(f"{option} must be a comma list of integers, got {text!r}") from None


@app.command()
@user_errors
def evaluate(
    pairs: Path = typer.Argument(..., help="CSV with header fixed,moving[,fixed_labels,moving_labels,fixed_landmarks,moving_landmarks,id]; relative paths from its folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder: results.csv, per_structure.csv, examples/."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma list of affine, instance, network, network-refine, ants-syn (default affine,ants-syn,instance, + network,network-refine with --model)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Network checkpoint for network / network-refine."),
    refine: int = typer.Option(50, "--refine", help="Refinement steps of network-refine."),
    lam: Optional[float] = typer.Option(None, "--lambda", "-l", help="Regularisation weight (instance, refinement, lambda-conditional network)."),
    similarity: str = typer.Option("ncc", "--similarity", "-s", help="Instance-optimisation similarity: ncc, mse or mi."),
    iterations: Optional[str] = typer.Option(None, "--iterations", help="Instance-optimisation Adam steps per pyramid level, coarse to fine (default 100,60,10)."),
    device: Device = "auto",
    structures: str = typer.Option("all", "--structures", help="Labels scored: all (present in both maps), a preset (aseg30, dkt31) or a label table file (LUT or code,name CSV) giving names."),
    exclude_labels: str = typer.Option("0", "--exclude-labels", help="Comma list of labels left out of Dice/HD95 (Mindboggle: 0,74)."),
    ants_threads: Optional[int] = typer.Option(None, "--ants-threads", help="ITK threads for ANTs SyN (default: all CPU cores)."),
    examples: int = typer.Option(2, "--examples", help="Write example slices for the first N pairs."),
) -> None:
    """Run several registration methods (voxreg and ANTs SyN) over PAIRS and record Dice, HD95,
    folding, SD log-Jacobian, NCC/MI, TRE, runtime and memory; rerunning resumes."""
    from voxreg.evaluation.runner import describe_row, evaluate as run_evaluation

    iteration_list = _int_list(iterations, "--iterations") if iterations else None
    excluded = _int_list(exclude_labels, "--exclude-labels")
    with progress_bar("evaluating") as update:
        result = run_evaluation(pairs, output, methods, model=model, refine=refine, lam=lam, similarity=similarity,
                                device=device, structures=structures, exclude_labels=excluded,
                                ants_threads=ants_threads, examples=examples, iterations=iteration_list,
                                progress=lambda done, total, row: update(done, total, describe_row(row)))
    console.print(f"{result.ran} run, {result.skipped} already done, {result.failed} failed -> {result.outdir}")
    for row in result.rows:
        if row.get("status") != "ok":
            console.print(f"  failed: {row.get('id')} {row.get('method')}: {row.get('error')}")
    console.print(f"  results       {result.results_csv}\n  per structure {result.per_structure_csv}")
    for name, path in result.report.items():
        console.print(f"  {name:13s} {path}")
    for warning in result.warnings:
        console.print(f"  warning: {warning}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
