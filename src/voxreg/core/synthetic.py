"""Synthetic data with a known deformation: for the demo, tests and benchmarks.

Everything here works offline (the MNI152 template lives in :mod:`voxreg.io.templates`).

Ground truth of a synthetic pair (:func:`make_synthetic_pair`)::

    moving      = warp(fixed, forward_field)          # forward_field: smooth, diffeomorphic
    true_field  = invert_field(forward_field)         # what a registration must recover
    warp(moving, true_field) ~= fixed                 # moving -> fixed, on the fixed grid

All fields follow :mod:`voxreg.core.spatial`: ``(1, ndim, *S)`` float32 in voxels of the fixed
grid, channel ``d`` = displacement along array axis ``d``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from voxreg.core import spatial
from voxreg.core.errors import VoxregError
from voxreg.core.image import Image

# --------------------------------------------------------------------------- fields


def _random_smooth_noise(
    shape: Sequence[int], channels: int, smoothness: float, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Smooth noise on a coarse grid (about 4 nodes per ``smoothness`` voxels)."""
    step = max(smoothness / 4.0, 1.0)
    coarse = tuple(max(int(np.ceil((s - 1) / step)) + 1, 4) for s in shape)
    coarse = tuple(min(c, s) for c, s in zip(coarse, shape))
    noise = rng.standard_normal((channels, *coarse)).astype(np.float32)
    sigma = [0] + [max((smoothness / 2.0) * (c - 1) / max(s - 1, 1), 0.5) for c, s in zip(coarse, shape)]
    return ndimage.gaussian_filter(noise, sigma, mode="reflect"), coarse


def _max_norm(field: Tensor) -> float:
    return float(field.square().sum(dim=1).sqrt().max())


def smooth_random_field(
    shape: Sequence[int],
    max_displacement: float = 5.0,
    smoothness: float = 12.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    steps: int = 7,
) -> Tensor:
    """Smooth, diffeomorphic random displacement ``(1, ndim, *shape)`` in voxels.

    A random velocity (Gaussian-smoothed noise, correlation length ~``smoothness`` voxels)
    is integrated by scaling and squaring on a coarse grid, resized to ``shape`` and
    scaled so that the largest displacement *vector norm* equals ``max_displacement``
    voxels exactly. The velocity scale is tuned first, so the final rescale is ~1 and the
    field stays invertible (Jacobian determinant > 0). Deterministic for a given seed.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 2:
        raise VoxregError(f"shape must be 2D or 3D with sizes >= 2, got {shape}")
    if max_displacement < 0 or smoothness <= 0:
        raise VoxregError(f"need max_displacement >= 0 and smoothness > 0, got {max_displacement}, {smoothness}")
    if max_displacement == 0:
        return torch.zeros((1, len(shape), *shape), device=device)
    noise, coarse = _random_smooth_noise(shape, len(shape), smoothness, np.random.default_rng(seed))
    velocity = torch.from_numpy(noise)[None].to(device)
    # velocity in voxels of the coarse grid: a coarse voxel is (s-1)/(c-1) fine voxels
    ratio = max((s - 1) / max(c - 1, 1) for s, c in zip(shape, coarse))
    target = max_displacement / ratio
    scale = target / max(_max_norm(velocity), 1e-12)
    for _ in range(4):
        coarse_field = spatial.integrate_velocity(velocity * scale, steps)
        scale *= target / max(_max_norm(coarse_field), 1e-12)
    field = spatial.resize_field(spatial.integrate_velocity(velocity * scale, steps), shape)
    return (field * (max_displacement / max(_max_norm(field), 1e-12))).contiguous()


# --------------------------------------------------------------------------- intensities


def _smooth_log_bias(shape: Sequence[int], rng: np.random.Generator, order: int = 2) -> np.ndarray:
    """Low-frequency cosine series with random coefficients, scaled to max |.| = 1."""
    ndim = len(shape)
    bases = [np.cos(np.pi * np.arange(order + 1)[:, None] * np.linspace(0, 1, s)[None]) for s in shape]
    coeffs = rng.standard_normal((order + 1,) * ndim)
    coeffs.flat[0] = 0.0  # no constant term
    letters = "ijk"[:ndim]
    expr = letters + "," + ",".join(f"{c}{c.upper()}" for c in letters) + "->" + letters.upper()
    log_bias = np.einsum(expr, coeffs, *bases, optimize=True)
    return log_bias / max(np.abs(log_bias).max(), 1e-12)


def intensity_change(
    array: np.ndarray, gamma: float = 1.3, bias_field_strength: float = 0.2, noise_std: float = 0.01, seed: int = 0
) -> np.ndarray:
    """Smooth nonlinear intensity change: ``clip(a**gamma * exp(b * B(x)) + noise, 0, 1)``.

    ``array`` is clipped to [0, 1] first; ``B`` is a random low-frequency field in [-1, 1]
    (so ``bias_field_strength`` 0.2 multiplies by 0.82..1.22); noise is Gaussian.
    Returns float32 in [0, 1].
    """
    if gamma <= 0:
        raise VoxregError(f"gamma must be > 0, got {gamma}")
    rng = np.random.default_rng(seed)
    out = np.clip(np.asarray(array, dtype=np.float32), 0.0, 1.0) ** np.float32(gamma)
    if bias_field_strength:
        out = out * np.exp(bias_field_strength * _smooth_log_bias(out.shape, rng)).astype(np.float32)
    if noise_std:
        out = out + rng.normal(0.0, noise_std, out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- pairs


@dataclass
class SyntheticPair:
    """A fixed/moving pair with known ground truth.

    ``moving = warp(fixed, forward_field)`` (then intensity-changed);
    ``true_field`` = inverse of ``forward_field`` = the field a moving -> fixed
    registration must recover: ``warp(moving, true_field) ~= fixed``.
    Labels are ``None`` when no label map was given.
    """

    fixed: Image
    moving: Image
    fixed_labels: Image | None
    moving_labels: Image | None
    true_field: Tensor
    forward_field: Tensor


def _to_tensor(array: np.ndarray, device: str | torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))[None, None].to(device)


def make_synthetic_pair(
    image: Image,
    labels: Image | None = None,
    max_displacement: float = 5.0,
    seed: int = 0,
    smoothness: float = 12.0,
    change_intensity: bool = True,
    device: str | torch.device = "cpu",
) -> SyntheticPair:
    """Warp ``image`` (and ``labels``, nearest) by a known smooth random field.

    ``fixed`` is ``image`` as float32; ``moving`` is it warped by ``forward_field``
    and, when ``change_intensity``, passed through :func:`intensity_change` (which
    clips to [0, 1]: give images scaled to [0, 1]). See :class:`SyntheticPair`.
    """
    if image.ndim not in (2, 3):
        raise VoxregError(f"image must be 2D or 3D, got shape {image.shape}")
    if labels is not None and labels.shape != image.shape:
        raise VoxregError(f"labels shape {labels.shape} differs from image shape {image.shape}")
    fixed_array = np.asarray(image.array, dtype=np.float32)
    forward = smooth_random_field(image.shape, max_displacement, smoothness, seed, device)
    moving_array = spatial.warp(_to_tensor(fixed_array, device), forward)[0, 0].cpu().numpy()
    if change_intensity:
        moving_array = intensity_change(moving_array, seed=seed + 1)
    moving_labels = None
    if labels is not None:
        warped = spatial.warp(_to_tensor(labels.array, device), forward, mode="nearest")
        moving_labels = labels.with_array(warped[0, 0].cpu().numpy())
    return SyntheticPair(
        fixed=image.with_array(fixed_array),
        moving=image.with_array(moving_array.astype(np.float32)),
        fixed_labels=None if labels is None else labels.with_array(labels.array.copy()),
        moving_labels=moving_labels,
        true_field=spatial.invert_field(forward),
        forward_field=forward,
    )


def blobs_image(shape: Sequence[int] = (32, 32), seed: int = 0, n_blobs: int = 4) -> tuple[Image, Image]:
    """A tiny image of Gaussian blobs in [0, 1] and its integer label map (int16).

    Label ``k`` (1..n_blobs) marks where blob ``k`` dominates and exceeds half its peak;
    0 is background. 2D or 3D; identity affine; deterministic for a given seed.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 8:
        raise VoxregError(f"blobs_image needs a 2D or 3D shape with sizes >= 8, got {shape}")
    rng = np.random.default_rng(seed)
    coords = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    size = np.asarray(shape, dtype=np.float32).reshape(-1, *([1] * len(shape)))
    blobs = []
    for _ in range(n_blobs):
        centre = rng.uniform(0.25, 0.75, len(shape)).astype(np.float32).reshape(size.shape) * size
        sigma = rng.uniform(0.08, 0.15) * float(min(shape))
        blobs.append(rng.uniform(0.6, 1.0) * np.exp(-((coords - centre) ** 2).sum(0) / (2 * sigma**2)))
    stack = np.stack(blobs)
    image = np.clip(stack.sum(0), 0, None)
    image = (image / image.max()).astype(np.float32)
    winner = stack.argmax(0)
    peaks = stack.reshape(n_blobs, -1).max(axis=1)
    labels = (winner + 1).astype(np.int16)
    labels[stack.max(0) < 0.5 * peaks[winner]] = 0
    return Image(image), Image(labels)
