"""The one training loop: unsupervised VoxelMorph training with exact resume and DDP.

The loss is :class:`~voxreg.training.objective.Objective` (similarity + lambda * regulariser
[+ Dice]); data come from a :class:`~voxreg.training.data.TrainingSet`. :func:`train` writes
``metrics.csv``, ``loss_curve.png``, ``last.pt`` (every ``checkpoint_every`` steps, at the
end and on SIGTERM/Ctrl-C) and ``best.pt`` (best validation Dice, or validation loss
without labels) to ``output_dir``. ``resume=True`` restores model, optimiser, RNG states and
step from ``last.pt`` so that a continued run gives the same weights as an uninterrupted
one (on the same device). Under ``torchrun`` it runs DistributedDataParallel
(:mod:`voxreg.training.distributed`).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from voxreg import io
from voxreg.core import spatial
from voxreg.core.errors import VoxregError
from voxreg.core.runtime import configure_allocator
from voxreg.core.schedule import cosine_factor
from voxreg.io.tables import append_row, read_table, write_table
from voxreg.nn import VoxelMorph, load_checkpoint, save_checkpoint
from voxreg.nn.unet import load_coarse_weights
from voxreg.registration.model_space import ModelSpace
from voxreg.training.augmentation import augment
from voxreg.training.config import PRESETS, RESUMABLE_CHANGES, TrainConfig
from voxreg.training.data import TrainingSet, scan_list
from voxreg.training.distributed import Dist, any_rank, barrier, gather_rng, init_distributed, teardown
from voxreg.training.objective import Objective, label_dice, sample_lambda
from voxreg.training.synth_data import MixedSource, SynthSource
from voxreg.viz.training import plot_losses

#: what the training loop draws its pairs from
TrainingData = TrainingSet | SynthSource | MixedSource

__all__ = [
    "TrainConfig",
    "TrainingSet",
    "TrainResult",
    "TrainingInterrupted",
    "train",
    "validate",
    "scan_list",
    "METRIC_COLUMNS",
]

METRIC_COLUMNS = (
    "step",
    "loss",
    "similarity",
    "regularizer",
    "lambda",
    "lr",
    "scale",
    "seconds",
    "val_dice",
    "val_loss",
)


# --------------------------------------------------------------------------- outputs


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model (eval mode), the last step and paths."""

    model: VoxelMorph
    step: int
    output_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    metrics_csv: Path
    loss_plot: Path
    best_metric: float | None
    history: list[dict[str, float]]


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after SIGTERM/SIGINT stopped training; ``last.pt`` holds the last step."""

    def __init__(self, step: int, checkpoint: Path, signum: int) -> None:
        super().__init__(f"training stopped by signal {signum} at step {step}; resume from {checkpoint}")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


def _write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    """(Re)write ``metrics.csv`` with the rows of ``history`` (:data:`METRIC_COLUMNS`)."""
    write_table(path, METRIC_COLUMNS, history)


def _append_metrics(path: Path, row: dict[str, float]) -> None:
    """Append one step's row to ``metrics.csv``."""
    append_row(path, METRIC_COLUMNS, row)


def _read_metrics(path: Path, upto: int) -> list[dict[str, float]]:
    """Rows of an existing metrics.csv with ``step <= upto`` (for resume)."""
    if not path.is_file():
        return []
    rows = [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in read_table(path, "metrics.csv")]
    for row in rows:
        row["step"] = int(row["step"])
    return [r for r in rows if r["step"] <= upto]


# --------------------------------------------------------------------------- session


@dataclass
class _Session:
    """What the loop updates and a checkpoint stores."""

    model: VoxelMorph  # the bare network (checkpoints, validation)
    net: torch.nn.Module  # what the training forward calls (the DDP wrapper under torchrun)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    scaler: Any = None
    step: int = 0
    best: float | None = None
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def _lr_factor(config: TrainConfig) -> Callable[[int], float]:
    """Learning-rate multiplier per step: 1, or cosine decay to 0 at ``config.steps``."""
    if config.lr_schedule == "constant":
        return lambda step: 1.0
    return lambda step: cosine_factor(min(step, config.steps) / config.steps, floor=0.0)


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bfloat16 (or float16 where bf16 is unsupported) for ``amp`` on CUDA; None otherwise."""
    if not config.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _initial_checkpoint(init: str) -> Path:
    """The file of ``--init``: a checkpoint path or a shipped model's name."""
    from voxreg.nn.shipped import find_shipped

    return Path(init) if Path(init).exists() or init.endswith(".pt") else find_shipped(init).path


def adopt_initial_network(config: TrainConfig) -> tuple[TrainConfig, str | None]:
    """With ``config.init``: the config with the network of the initial model (preset, field
    resolution, squaring steps) and, unless ``voxel_size`` is given, its model space's voxel
    size, so that ``voxreg train SCANS --init brain`` fine-tunes the shipped model as it was
    built and in the space it works in; returns the config and a line saying what was taken."""
    if config.init is None:
        return config, None
    source, extra = load_checkpoint(_initial_checkpoint(config.init))
    net = source.config
    names = [name for name, preset in PRESETS.items() if _same_layers(preset(ndim=net.ndim), net)]
    if not names:
        raise VoxregError(f"--init {config.init}: its network is neither vm1 nor vm2; fine-tune it from Python")
    if net.lambda_conditional and config.lam_range is None:
        raise VoxregError(f"--init {config.init}: a lambda-conditional model; give --lambda-range LO HI")
    if not net.lambda_conditional and config.lam_range is not None:
        raise VoxregError(f"--init {config.init}: not lambda-conditional; drop --lambda-range")
    space = extra.get("model_space") or {}
    voxel_size = config.voxel_size
    if voxel_size is None and space.get("voxel_size"):
        voxel_size = float(space["voxel_size"][0])
    fine = tuple(net.fine_features) or config.fine_features  # a coarse model may be widened (fine branch)
    adopted = replace(
        config,
        network=names[0],
        half_res=net.half_res,
        int_steps=net.int_steps,
        voxel_size=voxel_size,
        fine_features=fine if net.half_res else (),
    )
    note = f"--init {config.init}: network {names[0]}, half-res {net.half_res}, int-steps {net.int_steps}"
    note += f", fine branch {','.join(map(str, fine))}" if fine and net.half_res else ""
    return adopted, note + (f", model space {voxel_size:g} mm voxels" if voxel_size else "")


def adopt_resumed_run(config: TrainConfig, output_dir: str | os.PathLike[str]) -> TrainConfig:
    """For ``--resume``: ``init`` and ``voxel_size`` of the run in ``output_dir`` (its
    ``last.pt``) where the command leaves them unset, so that a run started with ``--init``
    resumes with the same command minus ``--init`` (the weights come from ``last.pt``)."""
    path = Path(output_dir) / "last.pt"
    if not path.is_file() or (config.init is not None and config.voxel_size is not None):
        return config
    saved = torch.load(path, map_location="cpu", weights_only=True).get("extra", {}).get("train_config", {})
    init = config.init if config.init is not None else saved.get("init")
    voxel_size = config.voxel_size if config.voxel_size is not None else saved.get("voxel_size")
    return replace(config, init=init, voxel_size=voxel_size)


def _same_layers(a: Any, b: Any) -> bool:
    """Whether two NetworkConfigs have the same encoder and decoder widths."""
    return tuple(a.enc_features) == tuple(b.enc_features) and tuple(a.dec_features) == tuple(b.dec_features)


def _load_initial_weights(model: VoxelMorph, init: str) -> None:
    """Start from the weights of a checkpoint or shipped model (fine-tuning); its network
    must equal the one this config builds (a clear error lists the differences;
    :func:`adopt_initial_network` makes them equal for ``voxreg train --init``)."""
    source, _ = load_checkpoint(_initial_checkpoint(init))
    wanted, given = model.config.to_dict(), source.config.to_dict()
    widened = not given.get("fine_features") and bool(wanted["fine_features"])  # coarse -> coarse-to-fine
    differences = [
        f"{key} {given.get(key)!r} vs {wanted[key]!r}"
        for key in wanted
        if wanted[key] != given.get(key, wanted[key] if key == "fine_features" else None)
        and not (widened and key == "fine_features")
    ]
    if differences:
        raise VoxregError(
            f"--init {init}: its network differs from this training's ({'; '.join(differences)}); "
            "pass the same --network/--half-res/--int-steps/--lambda-range options"
        )
    if widened:
        load_coarse_weights(model, source.state_dict())
    else:
        model.load_state_dict(source.state_dict())


def _new_session(config: TrainConfig, ndim: int, device: torch.device, ctx: Dist) -> _Session:
    """Seeded network (DDP-wrapped under torchrun), Adam, LR schedule, data RNG and scaler."""
    torch.manual_seed(config.seed)
    model = VoxelMorph(config.network_config(ndim)).to(device)
    if config.init is not None:
        _load_initial_weights(model, config.init)
    model.grad_checkpoint = config.grad_checkpoint
    net: torch.nn.Module = model
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config))
    generator = torch.Generator().manual_seed(config.seed + 1_000_003 * ctx.rank)
    scaler = torch.amp.GradScaler("cuda") if _amp_dtype(config, device) == torch.float16 else None
    return _Session(model, net, optimizer, scheduler, generator, scaler)


def _save(path: Path, session: _Session, config: TrainConfig, rngs: list[Tensor]) -> Path:
    """Write a checkpoint: network, config, step, optimiser, scheduler, RNG states, best metric."""
    extra = {
        "train_config": config.to_dict(),
        "step": session.step,
        "optimizer": session.optimizer.state_dict(),
        "scheduler": session.scheduler.state_dict(),
        "rng": rngs[0],
        "rng_ranks": rngs,
        "torch_rng": torch.get_rng_state(),
        "best_metric": session.best,
        "seconds": session.seconds,
    }
    if config.voxel_size is not None:  # the space the network works in (registration.model_space)
        ndim = session.model.config.ndim
        extra["model_space"] = ModelSpace(voxel_size=(config.voxel_size,) * ndim, ndim=ndim).to_dict()
    if session.scaler is not None:
        extra["scaler"] = session.scaler.state_dict()
    if torch.cuda.is_available():
        extra["cuda_rng"] = torch.cuda.get_rng_state_all()
    return save_checkpoint(path, session.model, extra)


def _check_resume_config(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """Refuse to resume when a field outside :data:`RESUMABLE_CHANGES` differs."""
    old = TrainConfig.from_dict(saved).to_dict()
    new = config.to_dict()
    changed = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])
    if changed:
        raise VoxregError(
            f"cannot resume from {path}: config differs in {changed} (only {sorted(RESUMABLE_CHANGES)} may change)"
        )


def _restore(
    path: Path, session: _Session, config: TrainConfig, device: torch.device, metrics_path: Path, ctx: Dist
) -> None:
    """Load ``last.pt`` into model, optimiser, scheduler, scaler, RNGs, step and history."""
    loaded, extra = load_checkpoint(path, device)
    _check_resume_config(extra.get("train_config", {}), config, path)
    if loaded.config != session.model.config:
        raise VoxregError(f"cannot resume from {path}: its network differs from the config")
    session.model.load_state_dict(loaded.state_dict())
    session.optimizer.load_state_dict(extra["optimizer"])
    if "scheduler" in extra:
        session.scheduler.load_state_dict(extra["scheduler"])
    if session.scaler is not None and "scaler" in extra:
        session.scaler.load_state_dict(extra["scaler"])
    rngs = extra.get("rng_ranks") or [extra["rng"]]
    if ctx.rank < len(rngs):
        session.generator.set_state(rngs[ctx.rank].cpu())
    else:  # more ranks than when saved: a fresh, distinct stream for the new rank
        session.generator.manual_seed(config.seed + 1_000_003 * ctx.rank + int(extra["step"]))
    torch.set_rng_state(extra["torch_rng"].cpu())
    if "cuda_rng" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in extra["cuda_rng"]])
    session.step, session.best = int(extra["step"]), extra.get("best_metric")
    session.seconds = float(extra.get("seconds", 0.0))
    session.history = _read_metrics(metrics_path, session.step)


class _StopSignals:
    """Turn SIGTERM/SIGINT into a flag while training (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        """Signal handler: remember the signal (the loop stops after the current step)."""
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _better(value: float, best: float | None, higher: bool) -> bool:
    """True when ``value`` is finite and beats ``best`` (higher or lower is better)."""
    if not math.isfinite(value):
        return False
    return best is None or (value > best if higher else value < best)


def _tensorboard(config: TrainConfig, out: Path, ctx: Dist) -> Any:
    """A TensorBoard SummaryWriter in ``out/tensorboard`` (rank 0, ``config.tensorboard``)."""
    if not config.tensorboard or not ctx.main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise VoxregError("--tensorboard needs the tensorboard package: pip install 'voxreg[tensorboard]'") from None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


# --------------------------------------------------------------------------- train


def _batch(
    data: TrainingData,
    config: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    step: int = 0,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """One training batch: moving, fixed, lambda per sample, optional (labels, labels, mask)."""
    if isinstance(data, MixedSource):
        data = data.synth if data.draws_synthetic(generator) else data.real
    if isinstance(data, SynthSource):
        return _synth_batch(data, config, generator, device, step)
    mi, fi = data.sample_pairs(config.batch_size, generator)
    lam = sample_lambda(config, config.batch_size, generator)
    moving, fixed = data.images[mi], data.images[fi]
    use_labels = data.labels is not None and config.dice_weight > 0
    mov_lab = data.labels[mi] if use_labels else None
    fix_lab = data.labels[fi] if use_labels else None
    if config.augment:
        moving, mov_lab = augment(moving, mov_lab, generator)
        fixed, fix_lab = augment(fixed, fix_lab, generator)
    labels = None
    if use_labels:
        both = (data.has_labels[mi] & data.has_labels[fi]).to(device)
        labels = (mov_lab.to(device), fix_lab.to(device), both)
    return moving.to(device), fixed.to(device), lam.to(device), labels


def synth_difficulty(config: TrainConfig, step: int) -> float:
    """Curriculum of synthetic training: 0.25 at step 0 rising linearly to 1 at
    ``synth_curriculum`` steps (1 throughout when the curriculum is 0)."""
    if config.synth_curriculum <= 0:
        return 1.0
    return min(1.0, 0.25 + 0.75 * step / config.synth_curriculum)


def _synth_batch(
    data: SynthSource, config: TrainConfig, generator: torch.Generator, device: torch.device, step: int
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
    """One synthetic batch: images, lambda and both label maps (every pair has labels); the
    deformations grow from 25 % to full strength over ``synth_curriculum`` steps."""
    pairs = data.batch(config.batch_size, generator, difficulty=synth_difficulty(config, step))
    lam = sample_lambda(config, config.batch_size, generator)
    both = torch.ones(config.batch_size, dtype=torch.bool, device=device)
    labels = (pairs.moving_labels.to(device), pairs.fixed_labels.to(device), both)
    return pairs.moving.to(device), pairs.fixed.to(device), lam.to(device), labels


def _network_output(net: Any, config: TrainConfig, moving: Tensor, fixed: Tensor, lam: Tensor) -> Any:
    """The network on a pair of training scans: on their ``similarity_scale``-voxel block
    means (the scans themselves at scale 1), with ``lam`` when it is lambda-conditional."""
    scale = config.similarity_scale
    return net(
        spatial.block_mean(moving, scale),
        spatial.block_mean(fixed, scale),
        lam if config.lambda_conditional else None,
    )


def _after_a_pass(
    net: Any, config: TrainConfig, moving: Tensor, fixed: Tensor, lam: Tensor, dtype: torch.dtype | None
) -> Tensor:
    """``moving`` warped by the network's own prediction for the pair, without gradient, on
    the training scans' grid (the similarity's): the input of a cascade's next pass, which at
    inference is the moving scan warped at the fine grid and then reduced to the model grid
    (``registration.network.warped_to_model_grid``), as :func:`_network_output` reduces it here."""
    with torch.no_grad(), torch.autocast(moving.device.type, dtype=dtype, enabled=dtype is not None):
        output = _network_output(net, config, moving, fixed, lam)
    field_ = spatial.upsample_field(output.field.float(), config.similarity_scale)
    return spatial.warp(moving, field_)


def _train_step(
    session: _Session, config: TrainConfig, data: TrainingData, objective: Objective, device: torch.device
) -> dict[str, float]:
    """One optimiser step on one batch; returns the loss terms."""
    moving, fixed, lam, labels = _batch(data, config, session.generator, device, session.step)
    dtype = _amp_dtype(config, device)
    if config.cascade_fraction > 0 and float(torch.rand((), generator=session.generator)) < config.cascade_fraction:
        moving = _after_a_pass(session.net, config, moving, fixed, lam, dtype)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        output = _network_output(session.net, config, moving, fixed, lam)
    field_, scale = output.field.float(), config.similarity_scale
    inverse = None
    if config.bidirectional:
        inverse = spatial.upsample_field(spatial.integrate_velocity(-output.velocity.float(), config.int_steps), scale)
    loss, sim, reg = objective(
        moving, fixed, spatial.upsample_field(field_, scale), lam, labels, inverse, network_field=field_
    )
    session.optimizer.zero_grad(set_to_none=True)
    if session.scaler is not None:
        session.scaler.scale(loss).backward()
        session.scaler.step(session.optimizer)
        session.scaler.update()
    else:
        loss.backward()
        session.optimizer.step()
    lr = session.optimizer.param_groups[0]["lr"]
    session.scheduler.step()
    return {
        "loss": float(loss.detach()),
        "similarity": float(sim.detach()),
        "regularizer": float(reg.detach()),
        "lambda": float(lam.mean()),
        "lr": lr,
    }


def check_dice_labels(has_labels: Sequence[bool], atlas: bool = False) -> None:
    """Refuse ``dice_weight > 0`` when no training pair can have label maps on both scans
    (``has_labels`` per scan, the atlas last in atlas mode)."""
    scans = list(has_labels[:-1]) if atlas else list(has_labels)
    if not any(has_labels):
        raise VoxregError(
            f"--dice-weight needs label maps, but none of the {len(has_labels)} training scans has one "
            "(give a CSV of scan,labels rows, or leave --dice-weight at 0)"
        )
    if (atlas and not (has_labels[-1] and any(scans))) or (not atlas and sum(scans) < 2):
        raise VoxregError(
            "--dice-weight needs label maps on both scans of a pair: "
            + ("the atlas (--atlas-labels) and at least one scan" if atlas else "at least 2 scans")
            + f" must have one ({sum(map(bool, has_labels))} of {len(has_labels)} have)"
        )


def _check_inputs(config: Any, training_set: Any, validation_set: Any) -> None:
    """Type checks of :func:`train`'s arguments (ValueError / VoxregError naming them)."""
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(training_set, (TrainingSet, SynthSource, MixedSource)):
        raise ValueError(
            f"training_set must be a TrainingSet, SynthSource or MixedSource, got {type(training_set).__name__}"
        )
    if isinstance(training_set, (SynthSource, MixedSource)) and config.dice_weight <= 0:
        raise VoxregError(
            "synthetic training learns from label maps only: set --dice-weight > 0 "
            "(e.g. --dice-weight 1 --similarity-weight 0)"
        )
    if isinstance(training_set, TrainingSet) and config.dice_weight > 0:
        check_dice_labels(training_set.has_labels.tolist(), training_set.atlas)
    scale = config.similarity_scale
    for name, data in (("training", training_set), ("validation", validation_set)):
        if isinstance(data, TrainingSet) and any(size % scale for size in data.shape):
            raise VoxregError(f"--similarity-scale {scale}: the {name} grid {data.shape} is not a multiple of {scale}")
    if validation_set is not None and validation_set.ndim != training_set.ndim:
        raise VoxregError("validation_set and training_set must have the same dimensionality")


def train(
    config: TrainConfig,
    training_set: TrainingData,
    output_dir: str | os.PathLike[str],
    validation_set: TrainingSet | None = None,
    resume: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a VoxelMorph network unsupervised (see the module docstring).

    ``progress(step, row)`` is called after every step with the metrics row. With
    ``resume=True`` training continues from ``output_dir/last.pt`` up to ``config.steps``.
    SIGTERM/SIGINT stop after the current step, save ``last.pt`` and raise
    :class:`TrainingInterrupted` (a ``KeyboardInterrupt``). Launched by ``torchrun`` with
    several processes, training runs DistributedDataParallel (each rank draws its own
    pairs; gradients are averaged; rank 0 validates and writes the outputs).
    """
    _check_inputs(config, training_set, validation_set)
    configure_allocator()
    ctx, device = init_distributed(config.device)
    try:
        result = _run(
            config, training_set, io.ensure_output_dir(output_dir), validation_set, resume, progress, ctx, device
        )
        barrier(ctx)  # every rank done (rank 0 writes last) before the group is torn down
        return result
    finally:
        teardown(ctx)


def _run(
    config: TrainConfig,
    training_set: TrainingData,
    out: Path,
    validation_set: TrainingSet | None,
    resume: bool,
    progress: Callable[[int, dict[str, float]], None] | None,
    ctx: Dist,
    device: torch.device,
) -> TrainResult:
    """The loop of :func:`train` in this process (after the process group is set up)."""
    last_path, best_path = out / "last.pt", out / "best.pt"
    metrics_path, plot_path = out / "metrics.csv", out / "loss_curve.png"
    session = _new_session(config, training_set.ndim, device, ctx)
    if resume:
        _restore(last_path, session, config, device, metrics_path, ctx)
    writer = _tensorboard(config, out, ctx)
    if ctx.main:
        _write_metrics(metrics_path, session.history)
    objective = Objective(config, training_set.num_classes)
    higher = validation_set is not None and validation_set.labels is not None
    stages: dict[float, TrainingData] = {1.0: training_set}
    session.net.train()
    start, offset = time.perf_counter(), session.seconds
    with _StopSignals() as stop:
        while session.step < config.steps:
            scale = config.stage_scale(session.step)
            if scale not in stages:
                stages[scale] = training_set.resized(scale)
            row = _train_step(session, config, stages[scale], objective, device)
            session.step += 1
            session.seconds = offset + time.perf_counter() - start
            row.update(step=session.step, scale=scale, seconds=session.seconds)
            if (
                ctx.main
                and validation_set is not None
                and (session.step % config.validate_every == 0 or session.step == config.steps)
            ):
                row.update(validate(session.model, validation_set, config, device))
                metric = row.get("val_dice", row["val_loss"])
                if _better(metric, session.best, higher):
                    session.best = metric
                    _save(best_path, session, config, [session.generator.get_state()])
            if ctx.main:
                _record(row, session, metrics_path, writer, progress)
            stopping = any_rank(stop.signum is not None, ctx, device)
            if session.step % config.checkpoint_every == 0 or session.step == config.steps or stopping:
                rngs = gather_rng(session.generator, ctx)
                if ctx.main:
                    _save(last_path, session, config, rngs)
                    plot_losses(plot_path, session.history)
            if stopping:
                raise TrainingInterrupted(session.step, last_path, stop.signum or signal.SIGTERM)
    if writer is not None:
        writer.close()
    if ctx.main and not last_path.exists():  # resumed a run that had already finished
        _save(last_path, session, config, gather_rng(session.generator, ctx))
    if ctx.main and not plot_path.exists() and session.history:
        plot_losses(plot_path, session.history)
    return TrainResult(
        session.model.eval(),
        session.step,
        out,
        last_path,
        best_path if best_path.exists() else None,
        metrics_path,
        plot_path,
        session.best,
        session.history,
    )


def _record(
    row: dict[str, float],
    session: _Session,
    metrics_path: Path,
    writer: Any,
    progress: Callable[[int, dict[str, float]], None] | None,
) -> None:
    """Append the step's row to the history, metrics.csv, TensorBoard and the progress callback."""
    session.history.append(row)
    _append_metrics(metrics_path, row)
    if writer is not None:
        for key, value in row.items():
            if key != "step":
                writer.add_scalar(key, value, row["step"])
    if progress is not None:
        progress(row["step"], row)


@torch.no_grad()
def validate(
    model: VoxelMorph, data: TrainingSet, config: TrainConfig, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Mean loss (and mean Dice of warped labels when labelled) over the validation pairs."""
    objective = Objective(config, data.num_classes)
    lam_value = config.validation_lambda
    was_training = model.training
    model.eval()
    losses, dices = [], []
    for m, f in data.validation_pairs():
        moving, fixed = data.images[m : m + 1].to(device), data.images[f : f + 1].to(device)
        lam = torch.full((1,), lam_value, device=device)
        coarse = _network_output(model, config, moving, fixed, lam).field
        field_ = spatial.upsample_field(coarse, config.similarity_scale)
        losses.append(float(objective(moving, fixed, field_, lam, network_field=coarse)[0]))
        if data.labels is not None and bool(data.has_labels[m] & data.has_labels[f]):
            warped = spatial.warp(data.labels[m : m + 1].to(device).float(), field_, mode="nearest")
            dices.append(label_dice(data.labels[f : f + 1].to(device), warped.long()))
    model.train(was_training)
    out = {"val_loss": float(np.mean(losses))}
    if dices:
        out["val_dice"] = float(np.nanmean(dices))
    return out
