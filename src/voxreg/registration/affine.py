"""Rigid and affine pre-alignment in world coordinates (RAS mm), fast on CPU.

The result is a matrix ``W`` (``4x4``, float64, RAS mm) mapping **fixed world points to
moving world points** (voxreg's convention), so
``io.resample_to(moving, fixed, world_matrix=W)`` puts the moving scan on the fixed grid.
Scans may come from any scanner: different sizes, voxel sizes (anisotropic too),
orientations and origins are handled because everything happens in millimetres.

Method:

1. **Pyramid.** Each image is block-averaged once to about the finest level spacing,
   scaled to [0, 1] (:func:`voxreg.io.normalize_intensity`), then for every level
   smoothed (Gaussian, sigma = half the level spacing) and resampled onto an isotropic
   grid of that spacing (e.g. 8, 4, 2 mm) covering the image's extent. Full 1 mm
   resolution is never used: that is what makes it fast.
2. **Samples.** At each level the fixed image is used as a set of sample points: the
   level voxels inside the (margin-padded) bounding box of the fixed foreground, or of
   ``fixed_mask``, subsampled at random (fixed seed) to ``max_points``.
3. **Initialisation.** Centres of mass and principal axes (eigenvectors of the
   intensity-weighted inertia tensor) of the foregrounds give candidates: the 4 proper
   rotations (det +1) aligning the moving axes to the fixed ones and the identity
   rotation, each with the centres of mass matched. Each is refined for a few rigid
   steps at the coarsest level and the best one is kept.
4. **Optimisation.** ``W(p) = L (p - c) + c + t`` about the fixed centre of mass ``c``,
   ``L = L0 @ expm(K)`` with ``K`` skew-symmetric (rigid) or general (affine: rotation,
   scaling and shear, det > 0), translations in units of the fixed radius of gyration.
   Adam on ``1 - global NCC`` or ``-MI`` (:func:`voxreg.losses.mattes_mi`) between the fixed samples
   and the moving level image sampled at ``W`` of them, counting only samples that land
   inside the moving image (and scaling the similarity down when under 75% of the fixed
   foreground does, so sliding out of the field of view is never rewarded); the best
   state seen is kept. ``transform='affine'`` runs the rigid stage on the first
   ``rigid_levels`` (coarsest) levels, then the affine stage on all of them.

Cost: 30 candidate steps and about 70 more (the rigid stage on the coarsest level only, then
the affine stage on every level) over at most ``max_points`` samples each: ~0.4 s for a
256x256x160 1 mm pair on one CPU core (``AffineConfig.threads``), independent of the full
resolution (Dice after affine of the 8 Mindboggle pairs 0.4163, every case of
``python -m benchmarks affine`` kept; halving the samples did not keep them: see docs/benchmarks.md).
Adam is :class:`voxreg.core.optim.Adam`: torch's update without the ``torch.optim`` class, whose first
construction in a process imports ``torch._dynamo`` (about 1.3 s once with torch 2.13).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from voxreg import io
from voxreg.core import optim, runtime, spatial
from voxreg.core.config import check_choice
from voxreg.core.errors import VoxregError
from voxreg.core.grid import embed_world, level_grid, mapped_coords, reduced_affine, voxel_spacing, world_points
from voxreg.core.image import Image
from voxreg.core.schedule import cosine_factor
from voxreg.losses import mattes_mi

__all__ = ["AffineConfig", "AffineResult", "affine_register", "mattes_mi"]

ProgressCallback = Callable[[int, int], None]
MaskLike = Image | np.ndarray | None

TRANSFORMS = ("rigid", "affine")
SIMILARITIES = ("ncc", "mi")
INITS = ("moments", "com", "identity")
SCALE_UNITS = ("mm", "factor")

_SMOOTH = 0.5  # Gaussian sigma of a level, in units of its spacing
_FOREGROUND = 0.1  # normalised intensity above which a voxel is foreground
_MARGIN = 0.15  # bounding-box margin of the fixed samples, fraction of the box size
_FULL_OVERLAP = 0.75  # fraction of fixed foreground inside the moving image with no penalty
_SEED = 0


# --------------------------------------------------------------------------- config / result


def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    """Lower-cased ``value`` checked by :func:`voxreg.core.config.check_choice`."""
    return check_choice(name, str(value).strip().lower(), allowed)


@dataclass
class AffineConfig:
    """Settings of :func:`affine_register` (defaults tuned on 1 mm brain MRI).

    ``scales`` are the pyramid voxel sizes in mm (``scale_unit='mm'``) or multiples of
    the fixed image's smallest voxel size (``'factor'``), coarse to fine, each run for
    ``iterations[i]`` Adam steps (per stage: 'affine' runs a rigid then an affine stage).
    ``lr`` is the Adam step at the coarsest level (radians / log-scale, translations in
    units of the fixed radius of gyration); it halves at each finer level.
    ``init_iterations`` rigid steps at the coarsest level rank the start candidates.
    ``rigid_levels``: for ``transform='affine'``, the rigid stage runs on the first (coarsest)
    ``rigid_levels`` levels only and the affine stage on all of them (1 kept the Dice after
    affine and of the network path on the 8 Mindboggle pairs at 0.2 s less than all levels).
    ``max_points`` caps the fixed samples per level; ``mi_bins`` is the MI histogram size.
    ``threads``: torch CPU threads during the call (restored after; 0 leaves the setting
    alone). One is fastest: the work is many small operations, and on a busy 2-core
    machine two threads were measured 30x slower (OpenMP barrier contention).
    """

    transform: str = "affine"
    similarity: str = "ncc"
    scales: tuple[float, ...] = (8.0, 4.0, 2.0)
    scale_unit: str = "mm"
    iterations: tuple[int, ...] = (20, 10, 6)
    lr: float = 0.02
    init: str = "moments"
    init_iterations: int = 6
    max_points: int = 1 << 16
    mi_bins: int = 32
    threads: int = 1
    rigid_levels: int = 1

    def __post_init__(self) -> None:
        self.transform = _choice("transform", self.transform, TRANSFORMS)
        self.similarity = _choice("similarity", self.similarity, SIMILARITIES)
        self.init = _choice("init", self.init, INITS)
        self.scale_unit = _choice("scale_unit", self.scale_unit, SCALE_UNITS)
        self.scales = tuple(float(s) for s in self.scales)
        self.iterations = tuple(int(i) for i in self.iterations)
        if not self.scales or len(self.scales) != len(self.iterations):
            raise ValueError(
                f"scales and iterations must be non-empty and of equal length; got "
                f"{len(self.scales)} scales and {len(self.iterations)} iterations"
            )
        if any(s <= 0 for s in self.scales) or any(i < 0 for i in self.iterations):
            raise ValueError(f"scales must be > 0 and iterations >= 0; got {self.scales}, {self.iterations}")
        if self.lr <= 0 or self.max_points < 64 or self.init_iterations < 0 or self.mi_bins < 4 or self.threads < 0:
            raise ValueError("need lr > 0, max_points >= 64, init_iterations >= 0, mi_bins >= 4 and threads >= 0")
        if self.rigid_levels < 0:
            raise ValueError(f"rigid_levels must be >= 0; got {self.rigid_levels}")


@dataclass
class AffineResult:
    """Outcome of :func:`affine_register`.

    ``world_matrix`` maps fixed world points to moving world points (4x4, RAS mm).
    ``similarity_before`` / ``similarity_after``: the configured similarity (global NCC,
    or MI in nats) at the finest pyramid level, without any transform (the scans as they
    lie in world space) and with ``world_matrix``. ``init`` names the starting candidate
    that won; ``history`` holds the loss of every optimiser step.
    """

    world_matrix: np.ndarray
    similarity_before: float
    similarity_after: float
    seconds: float
    init: str
    history: list[float] = dataclass_field(default_factory=list)


# --------------------------------------------------------------------------- geometry helpers


_MIN_LEVEL_VOXELS = 16  # a pyramid level keeps at least this many voxels across the fixed image


def _level_spacings(
    config: AffineConfig, fixed: np.ndarray, moving: np.ndarray, fixed_shape: Sequence[int]
) -> list[float]:
    """Pyramid spacings in mm, never finer than the finest voxel of either image and never
    so coarse that the fixed image spans fewer than ``_MIN_LEVEL_VOXELS`` voxels (small images)."""
    finest = float(min(voxel_spacing(fixed).min(), voxel_spacing(moving).min()))
    extent = float(min(np.asarray(fixed_shape) * voxel_spacing(fixed)))
    coarsest = max(extent / _MIN_LEVEL_VOXELS, finest)
    unit = float(voxel_spacing(fixed).min()) if config.scale_unit == "factor" else 1.0
    return [min(max(s * unit, finest), coarsest) for s in config.scales]


def _skew(params: Tensor, ndim: int) -> Tensor:
    """Skew-symmetric ``ndim x ndim`` matrix of 1 (2D) or 3 (3D) parameters."""
    zero = params.new_zeros(())
    if ndim == 2:
        return torch.stack([torch.stack([zero, -params[0]]), torch.stack([params[0], zero])])
    x, y, z = params
    return torch.stack([torch.stack([zero, -z, y]), torch.stack([z, zero, -x]), torch.stack([-y, x, zero])])


# --------------------------------------------------------------------------- pyramid


def _as_tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]


class _Pyramid:
    """One image prepared for registration: a normalised base (block-averaged to about
    the finest level spacing) from which every level is smoothed and resampled."""

    def __init__(self, image: Image, mask: MaskLike, finest: float, name: str) -> None:
        affine = reduced_affine(image.affine, image.ndim)
        self.affine, self.shape, self.name = affine, image.shape, name
        factors = [max(1, int(math.floor(finest / v + 1e-6))) for v in voxel_spacing(affine)]
        base, self.base_affine = spatial.block_average(_as_tensor(image.array), affine, factors)
        self.base = _as_tensor(io.normalize_intensity(base[0, 0].numpy()))
        self.mask = None
        if mask is not None:
            self.mask = spatial.block_average(_as_tensor(_mask_array(mask, image, name)), affine, factors)[0]
        self.variance = spatial.box_variance(factors, voxel_spacing(affine))
        self._cache: dict[tuple[float, bool], tuple[Tensor, np.ndarray]] = {}

    def level(self, spacing: float, mask: bool = False) -> tuple[Tensor, np.ndarray]:
        """Cached :meth:`make_level`."""
        key = (float(spacing), bool(mask))
        if key not in self._cache:
            self._cache[key] = self.make_level(spacing, mask)
        return self._cache[key]

    def make_level(self, spacing: float, mask: bool = False) -> tuple[Tensor, np.ndarray]:
        """Image (or mask) ``(1, 1, *S)`` on the isotropic ``spacing`` grid, and its affine:
        block-averaged by up to half the spacing, then Gaussian-smoothed to sigma
        ``spacing / 2`` in total, then linearly resampled."""
        grid_affine, shape = level_grid(self.affine, self.shape, spacing)
        base_voxel = voxel_spacing(self.base_affine)
        factors = [max(1, int(math.floor(spacing / (2.0 * v) + 1e-6))) for v in base_voxel]
        image = self.mask if mask and self.mask is not None else self.base
        source, source_affine = spatial.block_average(image, self.base_affine, factors)
        variance = self.variance + spatial.box_variance(factors, base_voxel)
        voxel = voxel_spacing(source_affine)
        sigmas = np.sqrt(np.clip((_SMOOTH * spacing) ** 2 - variance, 0.0, None)) / voxel
        blurred = spatial.gaussian_blur(source, sigmas)
        matrix = np.linalg.inv(source_affine) @ grid_affine
        if tuple(blurred.shape[2:]) == shape and np.allclose(matrix, np.eye(len(shape) + 1), atol=1e-4):
            return blurred, grid_affine
        coords = mapped_coords(matrix, shape)
        return spatial.sample(blurred, coords, padding="border"), grid_affine


def _mask_array(mask: Image | np.ndarray, image: Image, name: str) -> np.ndarray:
    """Float32 0/1 mask on ``image``'s grid (must have its shape)."""
    array = np.asarray(mask.array if isinstance(mask, Image) else mask)
    if array.shape != image.shape:
        raise VoxregError(f"{name}: mask of shape {array.shape} does not match the image shape {image.shape}")
    if not np.any(array):
        raise VoxregError(f"{name}: mask is empty (no nonzero voxel)")
    return (array > 0).astype(np.float32)


# --------------------------------------------------------------------------- moments


def _moments(image: Tensor, affine: np.ndarray, mask: Tensor | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Centre of mass, principal axes (columns, ascending eigenvalues) and radius of
    gyration (mm) of the intensities above the foreground threshold."""
    values = image.flatten().double().numpy()
    weights = np.clip(values - _FOREGROUND, 0.0, None)
    if mask is not None:
        weights = weights * (mask.flatten().double().numpy() > 0.5)
    if weights.sum() <= 0:
        weights = np.clip(values, 0.0, None)
    points = world_points(affine, image.shape[2:])
    total = weights.sum()
    com = points @ weights / total
    centred = points - com[:, None]
    inertia = (centred * weights) @ centred.T / total
    eigenvalues, axes = np.linalg.eigh(inertia)
    return com, axes, float(math.sqrt(max(eigenvalues.sum(), 1e-12)))


def _rotation_angle(rotation: np.ndarray) -> float:
    """Angle in degrees of a 2D or 3D rotation matrix."""
    if rotation.shape[0] == 2:
        return abs(math.degrees(math.atan2(rotation[1, 0], rotation[0, 0])))
    return math.degrees(math.acos(float(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))


def _candidates(init: str, fixed_axes: np.ndarray, moving_axes: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Named start rotations: identity, plus the 4 (3D) / 2 (2D) proper rotations mapping
    fixed principal axes onto moving ones with every sign flip."""
    ndim = fixed_axes.shape[0]
    out = [("com" if init != "identity" else "identity", np.eye(ndim))]
    if init != "moments":
        return out
    wanted = np.sign(np.linalg.det(moving_axes) * np.linalg.det(fixed_axes))
    for signs in itertools.product((1.0, -1.0), repeat=ndim):
        if np.prod(signs) == wanted:
            rotation = moving_axes @ np.diag(signs) @ fixed_axes.T
            label = "".join("+" if s > 0 else "-" for s in signs)
            out.append((f"moments {label} ({_rotation_angle(rotation):.0f} deg)", rotation))
    return out


# --------------------------------------------------------------------------- optimisation


@dataclass
class _Level:
    """Fixed sample points and the moving image of one pyramid level."""

    points: Tensor  # (ndim + 1, P) homogeneous fixed world points minus the centre c, float32
    values: Tensor  # (P,) fixed intensities
    moving: Tensor  # (1, 1, *S) moving level image
    to_moving: np.ndarray  # world -> moving level voxel
    moving_mask: Tensor | None
    to_grid: Tensor = dataclass_field(init=False)  # moving voxel -> grid_sample coordinates, float64
    high: Tensor = dataclass_field(init=False)  # (ndim,) largest inside grid coordinate per grid axis
    foreground: Tensor = dataclass_field(init=False)  # (P,) 1 where the fixed sample is foreground

    def __post_init__(self) -> None:
        shape = list(self.moving.shape[2:])
        ndim = len(shape)
        scale = np.array([2.0 / max(s - 1, 1) for s in shape])
        normalise = np.eye(ndim + 1)
        normalise[:ndim, :ndim] = np.diag(scale)[::-1]  # grid_sample: reversed axis order
        normalise[:ndim, ndim] = -1.0
        self.to_grid = torch.as_tensor(normalise @ self.to_moving, dtype=torch.float64)
        self.high = torch.as_tensor(((np.asarray(shape) - 1) * scale - 1.0)[::-1].copy(), dtype=torch.float32)
        self.foreground = (self.values > _FOREGROUND).float()


@dataclass
class _State:
    """Current transform ``W(p) = linear (p - centre) + centre + shift``."""

    linear: np.ndarray
    shift: np.ndarray
    centre: np.ndarray

    def world(self) -> np.ndarray:
        """The ``(ndim+1, ndim+1)`` world matrix."""
        ndim = self.centre.size
        out = np.eye(ndim + 1)
        out[:ndim, :ndim] = self.linear
        out[:ndim, ndim] = self.centre + self.shift - self.linear @ self.centre
        return out


def _fixed_samples(fixed: _Pyramid, spacing: float, centre: np.ndarray, max_points: int) -> tuple[Tensor, Tensor]:
    """Sample points ``(ndim + 1, P)`` (homogeneous: world minus ``centre``, then 1) and
    values ``(P,)`` of the fixed image at one level."""
    image, affine = fixed.level(spacing)
    ndim = image.dim() - 2
    if fixed.mask is None:
        region = image[0, 0] > _FOREGROUND
    else:
        region = fixed.level(spacing, mask=True)[0][0, 0] > 0.5
    if not bool(region.any()):
        region = torch.ones_like(region)
    select = torch.zeros_like(region)
    index = region.nonzero()
    low, high = index.min(0).values, index.max(0).values
    margin = ((high - low).double() * _MARGIN).ceil().long() + 1
    low = (low - margin).clamp_min(0)
    high = high + margin
    select[tuple(slice(int(a), int(b) + 1) for a, b in zip(low, high))] = True
    if fixed.mask is not None:
        select &= region
    flat = select.flatten().nonzero()[:, 0]
    if flat.numel() > max_points:
        generator = torch.Generator().manual_seed(_SEED)
        flat = flat[torch.randperm(flat.numel(), generator=generator)[:max_points]].sort().values
    voxels = np.stack(np.unravel_index(flat.numpy(), image.shape[2:])).astype(np.float64)
    world = affine[:ndim, :ndim] @ voxels + affine[:ndim, ndim:] - centre[:, None]
    homogeneous = np.vstack([world, np.ones((1, world.shape[1]))])
    return torch.as_tensor(homogeneous, dtype=torch.float32).contiguous(), image.flatten()[flat].contiguous()


def _build_level(fixed: _Pyramid, moving: _Pyramid, spacing: float, centre: np.ndarray, max_points: int) -> _Level:
    """Fixed samples and moving image (and mask) of the level of ``spacing`` mm."""
    points, values = _fixed_samples(fixed, spacing, centre, max_points)
    image, affine = moving.level(spacing)
    mask = moving.level(spacing, mask=True)[0] if moving.mask is not None else None
    return _Level(points, values, image, np.linalg.inv(affine), mask)


def _similarity(level: _Level, grid: Tensor, config: AffineConfig) -> tuple[Tensor, Tensor]:
    """(similarity, fraction of the fixed foreground samples inside the moving image) at
    the grid_sample coordinates ``grid`` ``(P, ndim)`` of the samples in the moving image."""
    count, ndim = grid.shape
    with torch.no_grad():
        inside = ((grid >= -1.0) & (grid <= level.high)).all(1).float()
        overlap = torch.dot(inside, level.foreground) / level.foreground.sum().clamp_min(1)
    view = grid.view(1, count, *([1] * (ndim - 1)), ndim)
    sampled = spatial.grid_sample(level.moving, view)
    if level.moving_mask is not None:
        mask = spatial.grid_sample(level.moving_mask, view, padding="zeros")
        inside = inside * mask.reshape(-1)
    if config.similarity == "mi":
        value = mattes_mi(level.values, sampled.reshape(-1), inside, config.mi_bins)
    else:
        value = _sample_ncc(level.values, sampled.reshape(-1), inside)
    return value, overlap


def _sample_ncc(fixed: Tensor, moving: Tensor, weights: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of two sample vectors over the samples of weight 1 (0 for a
    constant vector): the global NCC of :func:`voxreg.losses.global_ncc` without its
    image-shaped bookkeeping (measured 3x faster per affine step at 65536 samples)."""
    count = weights.sum().clamp_min(1.0)
    fixed_centred = (fixed - torch.dot(weights, fixed) / count) * weights
    moving_centred = moving - torch.dot(weights, moving) / count
    covariance = torch.dot(fixed_centred, moving_centred)
    variances = torch.dot(fixed_centred, fixed_centred) * torch.dot(weights, moving_centred * moving_centred)
    return covariance / torch.sqrt(variances + eps * count * count)


def _grid(level: _Level, state: _State, linear: Tensor, shift: Tensor) -> Tensor:
    """grid_sample coordinates ``(P, ndim)`` in the moving level image of the fixed samples
    mapped by ``W(p) = linear (p - c) + c + shift``: one small float64 matrix, one matmul
    (as ``(ndim, ndim + 1) @ (ndim + 1, P)``, transposed: 15x faster than ``(P, ndim + 1) @ ...``)."""
    ndim = linear.shape[0]
    to_grid = level.to_grid
    offset = to_grid[:ndim, :ndim] @ (torch.as_tensor(state.centre) + shift) + to_grid[:ndim, ndim]
    matrix = torch.cat([to_grid[:ndim, :ndim] @ linear, offset[:, None]], 1)
    return (matrix.float() @ level.points).t()


def _loss(similarity: Tensor, overlap: Tensor, config: AffineConfig) -> Tensor:
    """Loss to minimise. The similarity counts only samples inside the moving image; it is
    scaled down when less than 75% of the fixed foreground lands there, so that sliding
    out of the moving field of view is not rewarded."""
    factor = (overlap.detach() / _FULL_OVERLAP).clamp(max=1.0)
    if config.similarity == "mi":
        return -similarity * factor
    return 1.0 - similarity * factor


def _transform(params: Tensor, state: _State, kind: str, scale: float) -> tuple[Tensor, Tensor]:
    """(linear, shift) of ``state`` updated by ``params`` = generator entries + translation."""
    ndim = state.centre.size
    n_linear = params.numel() - ndim
    generator = _skew(params[:n_linear], ndim) if kind == "rigid" else params[:n_linear].view(ndim, ndim)
    linear = torch.as_tensor(state.linear) @ torch.linalg.matrix_exp(generator)
    return linear, torch.as_tensor(state.shift) + params[n_linear:] * scale


def _sort_samples(level: _Level, state: _State) -> None:
    """Reorder the samples (in place) along the moving image's memory layout at ``state``:
    interpolation then reads the moving image in order (measured 1.7x faster per step on
    a rotated 128^3 level, whose image does not fit in cache)."""
    with torch.no_grad():
        grid = _grid(level, state, torch.as_tensor(state.linear), torch.as_tensor(state.shift))
        key = torch.zeros(grid.shape[0], dtype=torch.int64)
        sizes = level.moving.shape[2:]
        for axis, size in enumerate(sizes):
            coord = (grid[:, len(sizes) - 1 - axis] + 1.0) * (max(size - 1, 1) / 2.0)
            key = key * (size + 2) + (coord.floor().clamp(-1, size).long() + 1)
        order = torch.argsort(key)
    level.points = level.points[:, order].contiguous()
    level.values = level.values[order].contiguous()
    level.foreground = level.foreground[order].contiguous()


def _optimise(
    level: _Level,
    state: _State,
    kind: str,
    steps: int,
    lr: float,
    scale: float,
    config: AffineConfig,
    history: list[float],
    tick: Callable[[], None],
) -> _State:
    """Run ``steps`` Adam steps (cosine-decayed ``lr``) from ``state``; return the best
    state seen, so a bad step is never kept."""
    ndim = state.centre.size
    n_linear = ndim * (ndim - 1) // 2 if kind == "rigid" else ndim * ndim
    params = torch.zeros(n_linear + ndim, dtype=torch.float64, requires_grad=True)
    adam = optim.Adam([params], lr=lr)
    _sort_samples(level, state)
    best = (math.inf, state)
    for step in range(steps + 1):
        linear, shift = _transform(params, state, kind, scale)
        similarity, overlap = _similarity(level, _grid(level, state, linear, shift), config)
        loss = _loss(similarity, overlap, config)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise VoxregError(
                "affine registration diverged (the loss became NaN); check the inputs or lower AffineConfig.lr"
            )
        if value < best[0]:
            best = (value, _State(linear.detach().numpy().copy(), shift.detach().numpy().copy(), state.centre))
        if step == steps:
            break
        history.append(value)
        adam.lr = lr * cosine_factor(step / max(steps, 1), floor=0.1)
        adam.step(torch.autograd.grad(loss, params))
        tick()
    return best[1]


def _evaluate(level: _Level, state: _State, config: AffineConfig) -> tuple[float, float]:
    """(similarity, loss) of ``state`` at ``level``."""
    with torch.no_grad():
        grid = _grid(level, state, torch.as_tensor(state.linear), torch.as_tensor(state.shift))
        similarity, overlap = _similarity(level, grid, config)
        return float(similarity), float(_loss(similarity, overlap, config))


# --------------------------------------------------------------------------- entry point


def _check_image(image: Image, role: str) -> str:
    """Name of ``image`` for messages; raise when it is empty, constant or not 2D/3D."""
    name = str(image.path) if image.path is not None else f"{role} image"
    if image.ndim not in (2, 3):
        raise VoxregError(f"{name}: cannot be aligned: expected a 2D or 3D image, got shape {image.shape}")
    array = np.asarray(image.array)
    # two passes and no voxel-sized temporary: min and max are NaN when any voxel is, and
    # infinite when any voxel is; both 0 exactly when every voxel is
    if array.size == 0:
        raise VoxregError(f"{name}: cannot be aligned: image is empty (it has no voxels)")
    low, high = float(array.min()), float(array.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise VoxregError(f"{name}: cannot be aligned: image holds NaN or Inf voxels")
    if low == high == 0.0:
        raise VoxregError(f"{name}: cannot be aligned: image is empty (all voxels are zero)")
    if low == high:
        raise VoxregError(f"{name}: cannot be aligned: image is constant (every voxel is {low:g})")
    return name


def affine_register(
    fixed: Image,
    moving: Image,
    config: AffineConfig | None = None,
    fixed_mask: MaskLike = None,
    moving_mask: MaskLike = None,
    progress: ProgressCallback | None = None,
) -> AffineResult:
    """Rigid or affine registration of ``moving`` to ``fixed`` in world space (RAS mm).

    Returns an :class:`AffineResult` whose ``world_matrix`` maps fixed world points to
    moving world points: ``io.resample_to(moving, fixed, world_matrix=...)`` aligns them.
    Masks (arrays or Images on each image's grid) restrict the fixed samples / the
    moving voxels used. ``progress(done, total)`` is called after every optimiser step.
    Raises VoxregError naming the file for an empty or constant image or a NaN result.
    """
    config = config or AffineConfig()
    runtime.configure_allocator()
    previous = torch.get_num_threads()
    rotation = _plane_rotation(fixed)
    if rotation is not None:  # a 2D slice outside the x-y plane: register within its own plane
        fixed, moving, fixed_mask, moving_mask = (
            _rotated(item, rotation) for item in (fixed, moving, fixed_mask, moving_mask)
        )
    with runtime.torch_threads(config.threads):
        result = _register(fixed, moving, config, fixed_mask, moving_mask, progress, prepare_threads=previous)
    if rotation is not None:
        result.world_matrix = rotation.T @ result.world_matrix @ rotation
    return result


def _plane_rotation(image: Image) -> np.ndarray | None:
    """For a 2D image whose plane is not the world x-y plane, the 4x4 rotation taking its
    two voxel axes into the x-y plane (None otherwise: nothing to do)."""
    columns = np.asarray(image.affine, dtype=np.float64)[:3, :2]
    if image.ndim != 2 or np.allclose(columns[2], 0.0):
        return None
    e1 = columns[:, 0] / np.linalg.norm(columns[:, 0])
    e2 = columns[:, 1] - (columns[:, 1] @ e1) * e1
    e2 /= np.linalg.norm(e2)
    rotation = np.eye(4)
    rotation[:3, :3] = np.stack([e1, e2, np.cross(e1, e2)])
    return rotation


def _rotated(item: Any, rotation: np.ndarray) -> Any:
    """An Image with its affine rotated (world coordinates ``rotation @ p``); others as is."""
    if not isinstance(item, Image):
        return item
    return Image(item.array, rotation @ np.asarray(item.affine, dtype=np.float64), item.path)


@dataclass
class _Problem:
    """Everything prepared once per call: the levels and the moments of both images."""

    levels: list[_Level]
    centre: np.ndarray  # fixed centre of mass (world mm)
    shift: np.ndarray  # moving minus fixed centre of mass
    radius: float  # fixed radius of gyration (mm): the unit of the translation parameters
    candidates: list[tuple[str, np.ndarray]]


def _prepare(
    fixed: Image, moving: Image, names: tuple[str, str], config: AffineConfig, masks: tuple[MaskLike, MaskLike]
) -> _Problem:
    """Pyramids, moments, start candidates and per-level samples of one pair."""
    ndim = fixed.ndim
    spacings = _level_spacings(
        config, reduced_affine(fixed.affine, ndim), reduced_affine(moving.affine, ndim), fixed.shape
    )
    pyramids = [_Pyramid(image, mask, min(spacings), name) for image, mask, name in zip((fixed, moving), masks, names)]
    moments = []
    for pyramid in pyramids:
        image, affine = pyramid.level(spacings[0])
        mask = None if pyramid.mask is None else pyramid.level(spacings[0], mask=True)[0]
        moments.append(_moments(image, affine, mask))
    (com_f, axes_f, radius), (com_m, axes_m, _) = moments
    levels = [_build_level(pyramids[0], pyramids[1], s, com_f, config.max_points) for s in spacings]
    shift = np.zeros(ndim) if config.init == "identity" else com_m - com_f
    return _Problem(levels, com_f, shift, radius, _candidates(config.init, axes_f, axes_m))


def _register(
    fixed: Image,
    moving: Image,
    config: AffineConfig,
    fixed_mask: MaskLike,
    moving_mask: MaskLike,
    progress: ProgressCallback | None,
    prepare_threads: int | None = None,
) -> AffineResult:
    """Body of :func:`affine_register` (thread setting handled by the caller). The pyramids
    and samples are prepared on ``prepare_threads`` torch threads (the caller's own): whole-image
    blurs and block averages, unlike the optimiser's many small operations, gain from every
    core (a 1 mm Mindboggle pair on 2 cores: 0.40 -> 0.38 s per call, the same transform)."""
    start = time.perf_counter()
    names = (_check_image(fixed, "fixed"), _check_image(moving, "moving"))
    if fixed.ndim != moving.ndim:
        raise VoxregError(f"{names[1]} is {moving.ndim}D but {names[0]} is {fixed.ndim}D")
    with torch.no_grad(), runtime.torch_threads(prepare_threads):
        problem = _prepare(fixed, moving, names, config, (fixed_mask, moving_mask))
    plan = _stage_plan(config)
    total = len(problem.candidates) * config.init_iterations + sum(config.iterations[index] for _, index in plan)
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    history: list[float] = []
    init, state = _pick_candidate(problem, config, tick)
    for kind, index in plan:
        lr = config.lr * 0.5**index
        steps = config.iterations[index]
        state = _optimise(problem.levels[index], state, kind, steps, lr, problem.radius, config, history, tick)
    identity = _State(np.eye(fixed.ndim), np.zeros(fixed.ndim), problem.centre)
    before = _evaluate(problem.levels[-1], identity, config)[0]
    after = _evaluate(problem.levels[-1], state, config)[0]
    if after < before:  # never leave the scans less similar than their headers left them
        state, after, init = identity, before, "identity (the optimised transform was less similar)"
    world = embed_world(state.world(), fixed.ndim)
    if not np.all(np.isfinite(world)) or not math.isfinite(after):
        raise VoxregError(f"{names[1]}: affine registration to {names[0]} gave a degenerate (NaN) result")
    return AffineResult(world, before, after, time.perf_counter() - start, init, history)


def _stage_plan(config: AffineConfig) -> list[tuple[str, int]]:
    """(transform kind, level index) of every optimisation run, in order: the rigid stage
    on all levels for ``transform='rigid'``, else on the first ``rigid_levels`` levels
    followed by the affine stage on all levels."""
    levels = range(len(config.scales))
    if config.transform == "rigid":
        return [("rigid", index) for index in levels]
    return [("rigid", index) for index in levels[: config.rigid_levels]] + [("affine", index) for index in levels]


def _pick_candidate(problem: _Problem, config: AffineConfig, tick: Callable[[], None]) -> tuple[str, _State]:
    """Refine every start rotation for ``init_iterations`` rigid steps at the coarsest
    level (twice the base lr); return the name and state of the best one."""
    level = problem.levels[0]
    best: tuple[float, str, _State] | None = None
    for name, rotation in problem.candidates:
        state = _State(rotation, problem.shift.copy(), problem.centre)
        state = _optimise(
            level, state, "rigid", config.init_iterations, config.lr * 2, problem.radius, config, [], tick
        )
        loss = _evaluate(level, state, config)[1]
        if best is None or loss < best[0] - 1e-6:
            best = (loss, name, state)
    assert best is not None
    return best[1], best[2]
