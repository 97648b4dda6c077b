"""Training augmentation: a small random affine (images linear, labels nearest; no flips)
and a random intensity change, drawn from the training ``torch.Generator``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from voxreg.core import spatial

__all__ = ["augment"]


def _random_affine(ndim: int, shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """Small voxel-space affine about the centre: rotation <= 5 deg, scale +-5 %, shift <= 2 vox."""
    u = lambda *s: torch.rand(*s, generator=generator) * 2 - 1  # noqa: E731
    n_rot = 3 if ndim == 3 else 1
    angles = u(n_rot) * math.radians(5)
    rot = torch.eye(ndim, dtype=torch.float64)
    planes = [(0, 1), (0, 2), (1, 2)][:n_rot]
    for (a, b), t in zip(planes, angles.double()):
        r = torch.eye(ndim, dtype=torch.float64)
        r[a, a], r[a, b], r[b, a], r[b, b] = t.cos(), -t.sin(), t.sin(), t.cos()
        rot = r @ rot
    linear = rot @ torch.diag(1 + 0.05 * u(ndim).double())
    centre = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64)
    matrix = torch.eye(ndim + 1, dtype=torch.float64)
    matrix[:ndim, :ndim] = linear
    matrix[:ndim, ndim] = centre - linear @ centre + 2.0 * u(ndim).double()
    return matrix.float()


def augment(images: Tensor, labels: Tensor | None, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """Random small affine (linear for images, nearest for labels; no flips) and intensity
    change (gamma in [0.8, 1.25], contrast +-10 %, brightness +-0.05, clipped to [0, 1])."""
    ndim, shape = images.dim() - 2, images.shape[2:]
    fields_ = torch.cat(
        [spatial.matrix_to_field(_random_affine(ndim, shape, generator), shape) for _ in range(images.shape[0])]
    ).to(images.device)
    out = spatial.warp(images, fields_)
    n = images.shape[0]
    view = (n,) + (1,) * (ndim + 1)
    gamma = torch.exp(torch.empty(n).uniform_(math.log(0.8), math.log(1.25), generator=generator))
    contrast = 1 + 0.1 * (torch.rand(n, generator=generator) * 2 - 1)
    bright = 0.05 * (torch.rand(n, generator=generator) * 2 - 1)
    dev = images.device
    out = out.clamp(0, 1).pow(gamma.to(dev).view(view)) * contrast.to(dev).view(view) + bright.to(dev).view(view)
    warped_labels = spatial.warp(labels, fields_, mode="nearest") if labels is not None else None
    return out.clamp(0, 1), warped_labels
