"""Instance optimisation: register one pair by optimising a field directly.

The field is parameterised on a grid at most ``field_scale`` times coarser than the
image (a stationary velocity integrated by scaling and squaring when
``diffeomorphic``), optimised with Adam over a multi-scale image pyramid with the same
losses as training: ``similarity(fixed, moving o phi) + lam * regulariser(phi)``.
Used alone (the default engine with no trained model) or as refinement after a network
(``initial_field``). Tensors follow voxreg's conventions: images ``(1, 1, *S)``, fields
``(1, ndim, *S)`` in voxels of the fixed grid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import torch
import torch.nn.functional as F
from torch import Tensor

from voxreg import losses
from voxreg.core import optim, runtime, spatial
from voxreg.core.config import check_choice, check_number
from voxreg.core.schedule import cosine_factor

ProgressCallback = Callable[[int, int], None]

# Default regularisation weight per similarity: the losses have different scales
# (1 - squared local NCC, MSE of [0, 1] intensities, -MI in nats).
DEFAULT_LAMBDA = {"ncc": 1.0, "mse": 0.02, "mi": 2.0}
# step size of the refinement after a network (the shipped model's refinement was measured with it)
REFINEMENT_LR = 0.25


@dataclass
class AlignConfig:
    """Settings of instance optimisation (defaults tuned on brain MRI at 1 mm).

    ``scales`` are the image pyramid factors (4 = quarter resolution), ``iterations`` the
    Adam steps per level, ``lr`` the step size in voxels of the velocity grid, which is
    ``field_scale`` times coarser than each level's image grid.
    """

    similarity: str = "ncc"
    window: int = 5
    lam: float | None = None  # None -> DEFAULT_LAMBDA[similarity]
    regularizer: str = "l2"
    scales: tuple[int, ...] = (4, 2, 1)
    iterations: tuple[int, ...] = (60, 30, 8)
    lr: float = 0.35
    diffeomorphic: bool = True
    int_steps: int = 6
    # the ``residual_levels`` finest levels (after the first) each optimise a residual
    # velocity, integrated with ``residual_int_steps`` squarings and composed after the
    # (fixed) field of the coarser levels, instead of re-integrating the whole velocity with
    # ``int_steps`` at every step, where that cost a third to a half of the step; 0 = never
    residual_levels: int = 2
    residual_int_steps: int = 2
    field_scale: int = 2
    mi_bins: int = 32
    # voxels below this intensity in both images (background, its noise) are left out of
    # the similarity: nothing to align there, and noise would only drive the field
    foreground_threshold: float = 0.05
    # Adam divides by the gradient RMS, so weak gradients (flat regions, an aligned pair)
    # would still move by ``lr``: its eps is set to ``adam_eps`` times the RMS of the first
    # gradient of each level, which damps gradients much weaker than the typical one
    # whatever the similarity's scale.
    adam_eps: float = 0.1
    # torch CPU threads during the call (restored after). 0 = per pyramid level, time one
    # step with the current thread count and one with a single thread and keep the faster:
    # on a CPU shared with other work, OpenMP barriers make 2 threads up to 10x slower
    # than 1 (measured on the 2-core development machine); on an idle one 2 are faster.
    threads: int = 0
    # the largest pyramid level optimised, in voxels (of the foreground box): a larger image
    # has every scale doubled until its finest level fits (a 0.7 mm 512x512x300 CT is then
    # optimised on its 1.4 mm level, as a 1.4 mm scan is, and the field resized to 0.7 mm):
    # 3 GB instead of 20 GB (python -m benchmarks large-scan). A 1 mm brain (10.5 M voxels)
    # or a 1 mm CT (27 M) keeps its full-resolution level. 0 = no limit.
    max_level_voxels: int = 32_000_000

    def __post_init__(self) -> None:
        self.similarity = check_choice("similarity", str(self.similarity).lower(), sorted(losses.SIMILARITY_LOSSES))
        check_choice("regularizer", str(self.regularizer).strip().lower(), sorted(losses.REGULARIZERS))
        if len(self.scales) != len(self.iterations):
            raise ValueError("scales and iterations must have the same length")
        if self.lam is None:
            self.lam = DEFAULT_LAMBDA[self.similarity]
        self.lam = check_number("lam", float(self.lam), low=0.0)
        if int(self.threads) < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if int(self.residual_levels) < 0:
            raise ValueError(f"residual_levels must be >= 0, got {self.residual_levels}")
        if int(self.residual_int_steps) < 0:
            raise ValueError(f"residual_int_steps must be >= 0, got {self.residual_int_steps}")
        if int(self.max_level_voxels) < 0:
            raise ValueError(f"max_level_voxels must be >= 0, got {self.max_level_voxels}")

    @property
    def total_iterations(self) -> int:
        """Number of optimiser steps over all levels."""
        return int(sum(self.iterations))

    def refinement(self, steps: int) -> AlignConfig:
        """A config for ``steps`` refinement iterations after a network: four in five at half
        scale, one in five (at least one) at full scale, where a step costs about 8x more
        (``python -m benchmarks refine-schedule``: 20 + 5 steps after the shipped model)."""
        fine = max(1, steps // 5)
        iterations = (max(steps - fine, 0), fine)
        return AlignConfig(**{**self.__dict__, "scales": (2, 1), "iterations": iterations, "lr": REFINEMENT_LR})


@dataclass
class AlignResult:
    """Field found by :func:`align` with the loss history, runtime and the pyramid scales it
    optimised (``config.scales``, or coarser for a very large image: :func:`capped_scales`)."""

    field: Tensor
    history: list[float] = dataclass_field(default_factory=list)
    seconds: float = 0.0
    scales: tuple[int, ...] = ()


_MIN_LEVEL_SIZE = 8  # an axis is only downsampled while it keeps at least this many voxels


def level_shape(shape: Sequence[int], factor: int) -> tuple[int, ...]:
    """Spatial shape of one pyramid level, per axis: ``size // factor``, but never below
    ``_MIN_LEVEL_SIZE`` voxels (an axis that cannot afford the level keeps its size), so
    thin, small and anisotropic scans skip the levels they cannot afford axis by axis."""
    return tuple(int(s) if factor == 1 else max(int(s) // factor, min(int(s), _MIN_LEVEL_SIZE)) for s in shape)


def capped_scales(scales: Sequence[int], shape: Sequence[int], max_voxels: int) -> tuple[int, ...]:
    """``scales`` doubled as often as needed for the finest level of an image of ``shape`` to
    hold at most ``max_voxels`` voxels (0: unchanged)."""
    factor = 1
    finest = min(scales)
    while max_voxels and math.prod(level_shape(shape, finest * factor)) > max_voxels:
        if level_shape(shape, finest * factor * 2) == level_shape(shape, finest * factor):
            break  # no axis can shrink any further
        factor *= 2
    return tuple(int(s) * factor for s in scales)


def _downsample(image: Tensor, factor: int) -> Tensor:
    """Light 3-voxel box blur (per axis, only along axes that shrink), then linear
    resampling to :func:`level_shape`."""
    shape = level_shape(image.shape[2:], factor)
    if shape == tuple(image.shape[2:]):
        return image
    window = [3 if new < old else 1 for new, old in zip(shape, image.shape[2:])]
    return spatial.resize_image(losses.box_filter(image, window), shape)


def _parameter_shape(level_shape: tuple[int, ...], field_scale: int) -> list[int]:
    """Grid of the optimised velocity at one pyramid level: ``field_scale`` times coarser
    than the level's image grid (smooth by construction and cheap to integrate)."""
    return [max(4, s // field_scale) for s in level_shape]


def _parameter_field(param: Tensor, config: AlignConfig, base: Tensor | None = None) -> Tensor:
    """Displacement on the parameter grid: the integrated velocity ``param``, or with ``base``
    (the fixed integrated field of the coarser levels) ``base`` composed after the residual
    velocity ``param`` integrated by ``residual_int_steps``."""
    if base is not None:
        return spatial.compose(base, spatial.integrate_velocity(param, config.residual_int_steps))
    return spatial.integrate_velocity(param, config.int_steps) if config.diffeomorphic else param


def _field_from_parameter(
    param: Tensor, shape: tuple[int, ...], config: AlignConfig, base: Tensor | None = None
) -> Tensor:
    """Displacement on the image grid ``shape`` from the optimised parameter
    (:func:`_parameter_field` resized)."""
    return spatial.resize_field(_parameter_field(param, config, base), shape)


def _level_fields(
    param: Tensor, shape: tuple[int, ...], config: AlignConfig, base: Tensor | None, initial: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(regularised field, field that warps the moving image on the level grid ``shape``).
    The regularised field stays on the parameter grid (its squared gradient is the resized
    field's, up to the borders, at an eighth of the cost): the field itself, or with
    ``initial`` (the initial field on the parameter grid) the residual, whose
    ``compose(initial, residual)`` is composed on the parameter grid and resized (a
    full-resolution composition per step would cost 13 -> 21 s per 1 mm pair)."""
    coarse = _parameter_field(param, config, base)
    if initial is None:
        return coarse, spatial.resize_field(coarse, shape)
    return coarse, spatial.resize_field(spatial.compose(initial, coarse), shape)


def _next_level(
    param: Tensor, base: Tensor | None, config: AlignConfig, level: int, shape: list[int]
) -> tuple[Tensor, Tensor | None]:
    """(parameter, base) of ``level`` on its parameter grid ``shape`` from the previous level's:
    a level optimising a residual (:attr:`AlignConfig.residual_levels`) starts from zero after
    the fixed field so far; any other continues the velocity, resized."""
    residual = config.diffeomorphic and level >= max(len(config.scales) - config.residual_levels, 1)
    with torch.no_grad():
        if not residual:
            return spatial.resize_field(param.detach(), shape), None
        so_far = spatial.resize_field(_parameter_field(param.detach(), config, base), shape)
    return torch.zeros_like(so_far), so_far


# voxels (of a level) the foreground may move during the level and still be sampled
_ACTIVE_MARGIN = 4
# warp the whole grid when the active voxels are more than this fraction of it
_SPARSE_BELOW = 0.6


def _active_voxels(fixed: Tensor, moving: Tensor, start: Tensor, config: AlignConfig) -> Tensor | None:
    """Flat indices of the voxels whose warped value the masked similarity can use during one
    level: the foreground of either image (the moving one warped by ``start``, the field at
    the level's start) grown by the NCC window radius and :data:`_ACTIVE_MARGIN`. None (warp
    every voxel) without a foreground threshold, when they fill most of the grid or when
    there are none."""
    threshold = config.foreground_threshold
    if threshold <= 0:
        return None
    warped = spatial.warp(moving, start)
    radius = (config.window // 2 if config.similarity == "ncc" else 0) + _ACTIVE_MARGIN
    core = ((fixed > threshold) | (warped > threshold)).to(fixed.dtype)
    active = losses.box_sum(core, [2 * radius + 1] * (fixed.dim() - 2)).flatten() > 0.5
    fraction = float(active.float().mean())
    if fraction > _SPARSE_BELOW or fraction == 0.0:  # mostly foreground, or none at all
        return None
    return torch.nonzero(active).flatten()


def _warp_level(moving: Tensor, field: Tensor, active: Tensor | None) -> Tensor:
    """``warp(moving, field)`` on the level grid, computed at the ``active`` voxels only (zero,
    i.e. background, elsewhere; the foreground mask leaves those out of the similarity)."""
    if active is None:
        return spatial.warp(moving, field)
    values = spatial.warp_at(moving, field, active)[0]
    channels, shape = moving.shape[1], field.shape[2:]
    dense = values.new_zeros(channels, math.prod(shape))
    return dense.index_copy(1, active, values).view(1, channels, *shape)


def _cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from ``base`` to ``0.1 * base`` over one pyramid level of ``total`` steps."""
    return base * cosine_factor(step / max(total - 1, 1), floor=0.1)


def _foreground(fixed: Tensor, warped: Tensor, threshold: float) -> Tensor | None:
    """Voxels above ``threshold`` in either image (None when the threshold is 0)."""
    if threshold <= 0:
        return None
    return ((fixed > threshold) | (warped > threshold)).to(fixed.dtype)


def _masked_similarity(similarity: torch.nn.Module, fixed: Tensor, warped: Tensor, mask: Tensor | None) -> Tensor:
    """Similarity loss over the foreground, scaled by its volume fraction so that background
    counts as perfectly aligned and ``lam`` keeps its meaning with or without a mask."""
    if mask is None:
        return similarity(fixed, warped)
    return similarity(fixed, warped, mask) * mask.mean()


class _FixedNCCLoss(torch.nn.Module):
    """``1 - local NCC`` against one pyramid level's fixed image, its box moments cached
    (:class:`voxreg.losses.FixedLocalNCC`: same value and gradient as ``NCCLoss``)."""

    def __init__(self, fixed: Tensor, window: int) -> None:
        super().__init__()
        self.ncc = losses.FixedLocalNCC(fixed, window)

    def forward(self, fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> Tensor:
        return 1.0 - self.ncc(warped, mask)


def _level_similarity(similarity: torch.nn.Module, fixed: Tensor, config: AlignConfig) -> torch.nn.Module:
    """The similarity for one pyramid level: local NCC with the fixed image's moments cached."""
    if config.similarity == "ncc":
        return _FixedNCCLoss(fixed, config.window)
    return similarity


def _set_relative_eps(optimizer: optim.Adam, grad: Tensor, relative: float) -> None:
    """Adam eps: ``relative`` times the RMS of ``grad``."""
    optimizer.eps = max(relative * float(grad.pow(2).mean().sqrt()), 1e-12)


def _similarity(config: AlignConfig) -> torch.nn.Module:
    """The similarity loss module named by ``config``."""
    if config.similarity == "ncc":
        return losses.similarity_loss("ncc", window=config.window)
    if config.similarity == "mi":
        # a fresh random subset of voxels each step: fast, and every voxel gets gradient over time
        return losses.similarity_loss("mi", bins=config.mi_bins, max_voxels=1 << 20, seed=None)
    return losses.similarity_loss(config.similarity)


def foreground_box(
    fixed: Tensor, moving: Tensor, margin: int = 8, threshold: float = 0.01, block: int = 4
) -> tuple[slice, ...]:
    """Bounding box (one slice per spatial axis) of the foreground of either image, grown
    by ``margin`` voxels. The foreground is where the ``block``-voxel block average exceeds
    ``threshold``, so isolated noise spikes in the background do not widen the box; the
    whole grid when nothing is above it."""
    pool = F.avg_pool3d if fixed.dim() == 5 else F.avg_pool2d
    both = torch.cat([fixed, moving], dim=1)
    coarse = pool(both, block, block, ceil_mode=True) if min(both.shape[2:]) >= block else both
    scale = block if coarse.shape != both.shape else 1
    mask = (coarse > threshold).any(dim=1)[0]
    box = []
    for axis, size in enumerate(fixed.shape[2:]):
        others = tuple(d for d in range(mask.dim()) if d != axis)
        hits = torch.nonzero(mask.any(dim=others) if others else mask).flatten()
        if hits.numel() == 0:
            return tuple(slice(0, s) for s in fixed.shape[2:])
        low, high = int(hits[0]) * scale, (int(hits[-1]) + 1) * scale
        box.append(slice(max(low - margin, 0), min(high + margin, size)))
    return tuple(box)


def _pad_to_grid(field: Tensor, box: tuple[slice, ...], shape: Sequence[int]) -> Tensor:
    """Extend a field computed inside ``box`` to the full grid by repeating its borders."""
    pads: list[int] = []
    for region, size in reversed(list(zip(box, shape))):
        pads += [region.start, size - region.stop]
    if not any(pads):
        return field
    return F.pad(field, pads, mode="replicate")


def align(
    fixed: Tensor,
    moving: Tensor,
    config: AlignConfig | None = None,
    initial_field: Tensor | None = None,
    progress: ProgressCallback | None = None,
) -> AlignResult:
    """Register ``moving`` to ``fixed`` (both ``(1, 1, *S)`` on the same grid, intensities
    in [0, 1]) by optimising a displacement field; returns it in voxels of the fixed grid.

    The optimisation runs inside the bounding box of the foreground of both images (the
    field is extended outside it by repeating its borders). With ``initial_field`` (e.g. a
    network prediction) a residual is optimised and the result is
    ``compose(initial_field, residual)``; every step warps the moving image once through that
    composition (no second interpolation of an already warped image).
    """
    config = config or AlignConfig()
    runtime.configure_allocator()
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must share a grid")
    start = time.perf_counter()
    # the box holds the foreground of both images, and of the moving one after the initial
    # field, so that the cropped moving image still holds what the composition samples
    source = moving if initial_field is None else torch.maximum(moving, spatial.warp(moving, initial_field))
    box = foreground_box(fixed, source, threshold=config.foreground_threshold or 0.01)
    region = (slice(None), slice(None)) + box
    previous = torch.get_num_threads()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        initial = None if initial_field is None else initial_field[region]
        scales = capped_scales(config.scales, fixed[region].shape[2:], int(config.max_level_voxels))
        if scales != tuple(config.scales):
            config = AlignConfig(**{**config.__dict__, "scales": scales})
        residual, history = _optimise(fixed[region], moving[region], config, progress, initial)
    finally:
        torch.set_num_threads(previous)
    with torch.no_grad():
        field = _pad_to_grid(residual, box, fixed.shape[2:])
        if initial_field is not None:
            field = spatial.compose(initial_field, field)
    return AlignResult(field=field, history=history, seconds=time.perf_counter() - start, scales=tuple(config.scales))


class _ThreadChooser:
    """``AlignConfig.threads == 0`` on CPU: per level, step 1 runs with the current thread
    count and step 2 with one thread; the faster setting runs the remaining steps. Once all
    threads won a level, the larger levels after it keep them without probing (a probe step
    with one thread costs ~0.4 s at full resolution on a 1 mm brain)."""

    _PROBES = (1, 2)

    def __init__(self, config: AlignConfig, device: torch.device) -> None:
        self.most = torch.get_num_threads()
        self.enabled = config.threads == 0 and device.type == "cpu" and self.most > 1
        self.active = False
        self.all_won = False
        self.seconds: dict[int, float] = {}
        self.started = 0.0

    def start_level(self, iterations: int) -> None:
        self.active = self.enabled and not self.all_won and iterations > max(self._PROBES) + 1
        self.seconds = {}
        if self.enabled:
            torch.set_num_threads(self.most)

    def before(self, step: int) -> None:
        if self.active and step in self._PROBES:
            torch.set_num_threads(self.most if step == self._PROBES[0] else 1)
            self.started = time.perf_counter()

    def after(self, step: int) -> None:
        if not (self.active and step in self._PROBES):
            return
        self.seconds[torch.get_num_threads()] = time.perf_counter() - self.started
        if step == self._PROBES[-1]:
            fastest = min(self.seconds, key=lambda n: self.seconds[n])
            self.all_won = fastest == self.most
            torch.set_num_threads(fastest)


def _optimise(
    fixed: Tensor,
    moving: Tensor,
    config: AlignConfig,
    progress: ProgressCallback | None,
    initial: Tensor | None = None,
) -> tuple[Tensor, list[float]]:
    """The multi-scale Adam loop on one grid; returns the field on it (the residual after
    ``initial`` when given) and the loss history."""
    similarity = _similarity(config).to(fixed.device)
    regularizer = losses.regularizer(config.regularizer).to(fixed.device)
    param: Tensor | None = None
    base: Tensor | None = None
    history: list[float] = []
    threads = _ThreadChooser(config, fixed.device)
    done = 0
    for level, (level_scale, iterations) in enumerate(zip(config.scales, config.iterations)):
        fixed_level = _downsample(fixed, level_scale)
        moving_level = _downsample(moving, level_scale)
        level_shape = tuple(fixed_level.shape[2:])
        param_shape = _parameter_shape(level_shape, config.field_scale)
        if param is None:
            param = torch.zeros(1, fixed.dim() - 2, *param_shape, device=fixed.device)
        else:
            param, base = _next_level(param, base, config, level, param_shape)
        param.requires_grad_(True)
        optimizer = optim.Adam([param], lr=config.lr)
        level_similarity = _level_similarity(similarity, fixed_level, config)
        initial_coarse = None if initial is None else spatial.resize_field(initial, param_shape)
        with torch.no_grad():
            start = _level_fields(param, level_shape, config, base, initial_coarse)[1]
            active = _active_voxels(fixed_level, moving_level, start, config)
        threads.start_level(iterations)
        for step in range(iterations):
            threads.before(step)
            optimizer.lr = _cosine_lr(config.lr, step, iterations)
            optimizer.zero_grad()
            field, total = _level_fields(param, level_shape, config, base, initial_coarse)
            warped = _warp_level(moving_level, total, active)
            mask = _foreground(fixed_level, warped.detach(), config.foreground_threshold)
            loss = _masked_similarity(level_similarity, fixed_level, warped, mask) + config.lam * regularizer(field)
            loss.backward()
            if step == 0 and param.grad is not None:
                _set_relative_eps(optimizer, param.grad, config.adam_eps)
            optimizer.step()
            history.append(float(loss.detach()))
            threads.after(step)
            done += 1
            if progress is not None:
                progress(done, config.total_iterations)
    with torch.no_grad():
        if param is None:
            return torch.zeros(1, fixed.dim() - 2, *fixed.shape[2:], device=fixed.device), history
        return _field_from_parameter(param.detach(), tuple(fixed.shape[2:]), config, base), history
