"""``voxreg train``: a thin command over :func:`voxreg.training.train` whose options are
the fields of :class:`~voxreg.training.TrainConfig` (defaults read from the dataclass, so
the CLI and the Python API cannot drift apart), plus the data options (scans, validation,
atlas, grid shape, cache) and ``--resume``. A bad value is one line on stderr, exit 2."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import typer

from voxreg.cli.progress import console, progress_bar, user_errors
from voxreg.core.errors import VoxregError
from voxreg.training.config import TrainConfig

__all__ = ["train", "config_from_options", "parse_schedule", "parse_shape"]

#: TrainConfig's defaults by field name (the one source of the CLI's defaults)
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
#: command parameter -> TrainConfig field (every field has exactly one option)
_OPTION_FIELDS = {
    "similarity": "similarity",
    "ncc_window": "window",
    "lam": "lam",
    "lam_range": "lam_range",
    "regularizer": "regularizer",
    "network": "network",
    "half_res": "half_res",
    "int_steps": "int_steps",
    "lr": "lr",
    "steps": "steps",
    "batch_size": "batch_size",
    "seed": "seed",
    "checkpoint_every": "checkpoint_every",
    "validate_every": "validate_every",
    "device": "device",
    "dice_weight": "dice_weight",
    "augment": "augment",
    "bidirectional": "bidirectional",
    "schedule": "schedule",
    "lr_schedule": "lr_schedule",
    "amp": "amp",
    "grad_checkpoint": "grad_checkpoint",
    "tensorboard": "tensorboard",
    "synth": "synth",
    "synth_shape": "synth_shape",
    "voxel_size": "voxel_size",
    "similarity_weight": "similarity_weight",
    "synth_curriculum": "synth_curriculum",
    "init": "init",
    "fine_features": "fine_features",
    "pairs_within_folders": "pairs_within_folders",
    "synth_fraction": "synth_fraction",
    "similarity_scale": "similarity_scale",
    "cascade_fraction": "cascade_fraction",
}
if set(_OPTION_FIELDS.values()) != set(_DEFAULTS):  # pragma: no cover - caught by any test importing the CLI
    raise RuntimeError(
        f"voxreg train options miss TrainConfig fields {sorted(set(_DEFAULTS) - set(_OPTION_FIELDS.values()))}"
    )


def parse_schedule(stages: list[str]) -> list[tuple[float, int]]:
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


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"64x80x64"`` (3D) or ``"64x64"`` (2D) -> a tuple of ints; None stays None."""
    if text is None:
        return None
    parts = re.split(r"[x,]", text.strip().lower())
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) not in (2, 3) or min(shape) < 2:
        raise VoxregError(f"--shape takes 2 or 3 sizes >= 2 such as 64x80x64 or 64x64, got {text!r}")
    return shape


def parse_features(text: str | None) -> tuple[int, ...]:
    """``'16'`` or ``'16,8'`` -> (16,) / (16, 8); empty or None -> ()."""
    if not text:
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"fine_features must be comma-separated channel counts, got {text!r}") from None


def config_from_options(options: dict[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` of the command's options; a bad value is a VoxregError
    carrying the config's ValueError text (one line, exit 2)."""
    kwargs = {field: options[param] for param, field in _OPTION_FIELDS.items()}
    try:
        kwargs["schedule"] = parse_schedule(list(kwargs["schedule"]))
        kwargs["synth_shape"] = parse_shape(kwargs["synth_shape"])
        kwargs["fine_features"] = parse_features(kwargs["fine_features"])
        return TrainConfig(**kwargs)
    except ValueError as exc:
        raise VoxregError(_option_message(str(exc))) from None


#: TrainConfig field -> its command-line option, where the names differ
_FIELD_OPTIONS = {
    "fine_features": "--fine-features",
    "lam": "--lambda",
    "window": "--ncc-window",
    "lam_range": "--lambda-range",
}


def _option_message(text: str) -> str:
    """A TrainConfig ValueError with its leading field name replaced by the option name
    (``lr must be ...`` -> ``--lr must be ...``)."""
    match = re.match(r"([a-z_]+)(\[\d\])?(?= )", text)
    if match is None or match.group(1) not in _DEFAULTS:
        return text
    field = match.group(1)
    option = _FIELD_OPTIONS.get(field, "--" + field.replace("_", "-"))
    return option + (match.group(2) or "") + text[match.end() :]


def _train_info(row: dict[str, float]) -> str:
    """Loss (and the last validation Dice) for the training progress bar."""
    text = f"loss {row['loss']:.4f}"
    return text + (f" val Dice {row['val_dice']:.3f}" if "val_dice" in row else "")


def _schedule_default() -> list[str]:
    """TrainConfig's default schedule as ``SCALE:STEPS`` strings."""
    return [f"{scale}:{steps}" for scale, steps in _DEFAULTS["schedule"]]


@user_errors
def train(
    scans: list[str] = typer.Argument(
        None,
        help="Training scans: files, folders, globs or a CSV (scan[,labels]); with --synth: optional label maps for the 'user' source.",
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder: checkpoints, metrics.csv, loss_curve.png."),
    val: list[str] = typer.Option([], "--val", help="Validation scans (same forms; a CSV can give label maps)."),
    similarity: str = typer.Option(_DEFAULTS["similarity"], "--similarity", "-s", help="ncc, mse or mi."),
    lam: float = typer.Option(_DEFAULTS["lam"], "--lambda", "-l", help="Regularisation weight."),
    ncc_window: int = typer.Option(_DEFAULTS["window"], "--ncc-window", help="Local NCC window size (voxels)."),
    lam_range: tuple[float, float] | None = typer.Option(
        _DEFAULTS["lam_range"], "--lambda-range", help="Train one lambda-conditional model over [LO, HI]."
    ),
    regularizer: str = typer.Option(
        _DEFAULTS["regularizer"], "--regularizer", help="Smoothness penalty of the field: l2, l1 or bending."
    ),
    network: str = typer.Option(_DEFAULTS["network"], "--network", help="vm1 or vm2 feature sizes."),
    half_res: bool = typer.Option(
        _DEFAULTS["half_res"], "--half-res", help="Predict the field at half resolution (faster)."
    ),
    int_steps: int = typer.Option(
        _DEFAULTS["int_steps"], "--int-steps", help="Scaling-and-squaring steps (0 = plain displacement)."
    ),
    steps: int = typer.Option(_DEFAULTS["steps"], "--steps", help="Optimiser steps."),
    lr: float = typer.Option(_DEFAULTS["lr"], "--lr", help="Adam learning rate."),
    batch_size: int = typer.Option(_DEFAULTS["batch_size"], "--batch-size"),
    shape: str | None = typer.Option(
        None, "--shape", help="Resize every scan to this grid: 64x80x64 (3D) or 64x64 (2D)."
    ),
    dice_weight: float = typer.Option(
        _DEFAULTS["dice_weight"], "--dice-weight", help="Semi-supervised Dice weight (needs label maps)."
    ),
    augment: bool = typer.Option(
        _DEFAULTS["augment"], "--augment", help="Small random affine + intensity augmentation."
    ),
    atlas: Path | None = typer.Option(
        None, "--atlas", help="Scan-to-atlas training: every pair is scan -> this atlas."
    ),
    atlas_labels: Path | None = typer.Option(None, "--atlas-labels", help="Label map of the atlas (semi-supervised)."),
    bidirectional: bool = typer.Option(
        _DEFAULTS["bidirectional"],
        "--bidirectional",
        help="Also score fixed warped by the inverse (needs --int-steps).",
    ),
    schedule: list[str] = typer.Option(
        _schedule_default(),
        "--schedule",
        help="Coarse-to-fine stage SCALE:STEPS (repeatable), e.g. 0.5:1000; then full resolution.",
    ),
    lr_schedule: str = typer.Option(_DEFAULTS["lr_schedule"], "--lr-schedule", help="constant or cosine."),
    amp: bool = typer.Option(
        _DEFAULTS["amp"], "--amp", help="Mixed precision on CUDA (bf16; fp16 + scaling where bf16 is unsupported)."
    ),
    grad_checkpoint: bool = typer.Option(
        _DEFAULTS["grad_checkpoint"], "--grad-checkpoint", help="Recompute activations: less memory for large volumes."
    ),
    tensorboard: bool = typer.Option(
        _DEFAULTS["tensorboard"], "--tensorboard", help="Also log to OUTPUT/tensorboard (needs tensorboard)."
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="Cache of the scans on the training grid (.pt), reused when the inputs match."
    ),
    checkpoint_every: int = typer.Option(_DEFAULTS["checkpoint_every"], "--checkpoint-every"),
    validate_every: int = typer.Option(_DEFAULTS["validate_every"], "--validate-every"),
    seed: int = typer.Option(_DEFAULTS["seed"], "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUTPUT from last.pt."),
    device: str = typer.Option(_DEFAULTS["device"], "--device", help="auto (CUDA when available), cpu or cuda[:N]."),
    synth: str | None = typer.Option(
        _DEFAULTS["synth"],
        "--synth",
        help="Train on synthetic label-map pairs: SOURCE[:WEIGHT],... from brain, shapes, user (e.g. brain:0.8,shapes:0.2).",
    ),
    synth_shape: str | None = typer.Option(
        None, "--synth-shape", help="Grid of the synthetic pairs, e.g. 64x80x64 (3D) or 96x112 (2D)."
    ),
    voxel_size: float | None = typer.Option(
        _DEFAULTS["voxel_size"],
        "--voxel-size",
        help="Voxel size (mm) of the model's space, recorded in the checkpoint; real scans are resampled to it (default with --init: the initial model's).",
    ),
    init: str | None = typer.Option(
        _DEFAULTS["init"],
        "--init",
        help="Start from the weights of a checkpoint or a shipped model (fine-tuning on your own scans); its network options and voxel size are taken.",
    ),
    synth_curriculum: int = typer.Option(
        _DEFAULTS["synth_curriculum"],
        "--synth-curriculum",
        help="Steps over which synthetic deformations grow from 25 % to full strength (0: full from the start).",
    ),
    fine_features: str | None = typer.Option(
        ",".join(map(str, _DEFAULTS["fine_features"])) or None,
        "--fine-features",
        help="With --half-res: a full-resolution correction branch with these conv widths, e.g. 16 (coarse-to-fine field).",
    ),
    pairs_within_folders: bool = typer.Option(
        False,
        "--pairs-within-folders",
        help="Draw training pairs only between scans of the same folder (e.g. brains/ with brains/, heads/ with heads/).",
    ),
    similarity_weight: float = typer.Option(
        _DEFAULTS["similarity_weight"],
        "--similarity-weight",
        help="Weight of the image similarity (0 for label-only synthetic training).",
    ),
    synth_fraction: float = typer.Option(
        _DEFAULTS["synth_fraction"],
        "--synth-fraction",
        help="With --synth and training scans: share of steps on synthetic pairs (similarity + Dice); the rest are real scan pairs (similarity only).",
    ),
    similarity_scale: int = typer.Option(
        _DEFAULTS["similarity_scale"],
        "--similarity-scale",
        help="Score the similarity on a grid this many times finer than the model's (scans loaded at voxel size / N; the network sees N-voxel block means).",
    ),
    cascade_fraction: float = typer.Option(
        _DEFAULTS["cascade_fraction"],
        "--cascade-fraction",
        help="Share of steps trained as a later pass of a cascade (register --passes): the moving scan first warped by the network's own prediction, without gradient.",
    ),
) -> None:
    """Train a VoxelMorph network without labels (scan-to-scan pairs), on CPU or GPU."""
    from voxreg import training
    from voxreg.training.trainer import adopt_initial_network, adopt_resumed_run

    config = config_from_options(locals())
    if resume:
        config = adopt_resumed_run(config, output)
    config, adopted = adopt_initial_network(config)
    if adopted:
        console.print(adopted)
    grid = parse_shape(shape)
    data = _training_data(config, scans or [], grid, cache, atlas, atlas_labels)
    validation = None
    if val:
        val_scans, val_labels = training.scan_list(val)
        validation = training.TrainingSet.from_paths(
            val_scans,
            val_labels,
            shape=grid or data.shape,
            atlas=atlas,
            atlas_labels=atlas_labels,
        )
    with progress_bar("training") as update:
        try:
            result = training.train(
                config,
                data,
                output,
                validation,
                resume=resume,
                progress=lambda step, row: update(step, config.steps, _train_info(row)),
            )
        except training.TrainingInterrupted as stop:
            console.print(f"stopped at step {stop.step}; saved {stop.checkpoint} (continue with --resume)")
            raise typer.Exit(code=130) from None
    console.print(f"trained {result.step} steps -> {result.output_dir}")
    console.print(f"  last {result.last_checkpoint}\n  best {result.best_checkpoint}\n  metrics {result.metrics_csv}")


def _training_data(
    config: TrainConfig,
    scans: list[str],
    grid: tuple[int, ...] | None,
    cache: Path | None,
    atlas: Path | None,
    atlas_labels: Path | None,
) -> Any:
    """Real scans (a TrainingSet), with ``--synth`` a SynthSource (scans = user label maps), or
    with ``--synth --synth-fraction F < 1`` both mixed (a MixedSource, scans = real scans)."""
    from voxreg import io, training
    from voxreg.training.synth_data import SynthSource, synth_config_of
    from voxreg.training.trainer import check_dice_labels

    if config.synth is not None and config.synth_fraction < 1.0:
        return _mixed_data(config, scans, grid, cache)
    if config.synth is None:
        if not scans:
            raise VoxregError("give training scans (files, folders, globs or a CSV), or --synth")
        train_scans, train_labels = training.scan_list(scans)
        if config.dice_weight > 0:  # before any scan is loaded or a cache written
            has = [label is not None for label in train_labels]
            check_dice_labels(has + [atlas_labels is not None] if atlas else has, atlas is not None)
        data = training.TrainingSet.from_paths(
            train_scans,
            train_labels,
            shape=grid,
            cache=cache,
            atlas=atlas,
            atlas_labels=atlas_labels,
            voxel_size=config.scan_voxel_size,
        )
        return data.grouped_by([path.parent for path in train_scans]) if config.pairs_within_folders else data
    ndim = len(config.synth_shape) if config.synth_shape else 3
    maps = [io.load_image(path, label=True).array for path in training.scan_list(scans)[0]] if scans else None
    try:
        return SynthSource(synth_config_of(config, ndim), label_maps=maps)
    except ValueError as exc:
        raise VoxregError(str(exc)) from None


def _mixed_data(config: TrainConfig, scans: list[str], grid: tuple[int, ...] | None, cache: Path | None) -> Any:
    """Real training scans mixed with synthetic pairs (``--synth-fraction`` below 1)."""
    from voxreg import training
    from voxreg.training.config import parse_synth_sources
    from voxreg.training.synth_data import MixedSource, SynthSource, synth_config_of

    if not scans:
        raise VoxregError("--synth-fraction below 1 mixes synthetic pairs with real ones: give training scans")
    if "user" in parse_synth_sources(config.synth or ""):
        raise VoxregError("--synth-fraction below 1 takes the scans as real training scans: drop the 'user' source")
    train_scans, _ = training.scan_list(scans)
    real = training.TrainingSet.from_paths(
        train_scans, None, shape=grid, cache=cache, voxel_size=config.scan_voxel_size
    )
    if config.pairs_within_folders:
        real = real.grouped_by([path.parent for path in train_scans])
    ndim = len(config.synth_shape) if config.synth_shape else real.ndim
    try:
        return MixedSource(real, SynthSource(synth_config_of(config, ndim)), config.synth_fraction)
    except ValueError as exc:
        raise VoxregError(str(exc)) from None
