"""Resampling between grids in world space (one interpolation through the composite transform)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from voxreg.core import spatial
from voxreg.core.errors import VoxregError
from voxreg.core.grid import mapped_coords, voxel_matrix
from voxreg.core.image import Image


def resample_to(
    moving: Image,
    fixed: Image,
    world_matrix: np.ndarray | None = None,
    nearest: bool | None = None,
    device: str | torch.device = "cpu",
    field: np.ndarray | torch.Tensor | None = None,
) -> Image:
    """Resample ``moving`` onto ``fixed``'s grid in world coordinates.

    Handles different shapes, voxel sizes and orientations. Label maps (integer
    arrays) use nearest neighbour and 0 outside; intensities use linear interpolation and
    ``min(moving minimum, 0)`` outside its field of view (0 for MRI, air for CT in HU).
    ``world_matrix`` maps fixed world points to moving world points (identity when None);
    ``field`` is a displacement in fixed voxels applied first, so a fixed voxel ``x`` samples
    the moving scan at ``world_matrix(fixed_affine (x + field(x)))`` with ONE interpolation.
    The result carries the fixed affine.
    """
    if moving.ndim != fixed.ndim:
        raise VoxregError(
            f"cannot resample the {moving.ndim}D image {moving.name} onto the {fixed.ndim}D grid of {fixed.name}"
        )
    ndim = fixed.ndim
    matrix = voxel_matrix(fixed.affine, moving.affine, ndim, world_matrix)
    if field is None and np.allclose(matrix, np.eye(ndim + 1), atol=1e-6) and moving.shape == fixed.shape:
        return Image(moving.array.copy(), fixed.affine.copy(), moving.path, moving.kind)
    use_nearest = moving.is_label if nearest is None else nearest
    array = moving.array
    if np.issubdtype(array.dtype, np.floating) or not use_nearest:
        array = array.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(array))[None, None].to(device)
    coords = (
        mapped_coords(matrix, fixed.shape, device)
        if field is None
        else _displaced_coords(matrix, field, fixed.shape, device)
    )
    if use_nearest:
        out = spatial.sample(tensor, coords, "nearest", padding="zeros")
    else:  # pad with min(image min, 0): sample (image - low) with zero padding, add low back
        low = min(float(tensor.min()), 0.0) if tensor.numel() else 0.0
        out = spatial.sample(tensor - low, coords, "linear", padding="zeros") + low
    kind = "label" if use_nearest and moving.is_label else None
    return Image(out[0, 0].cpu().numpy(), fixed.affine.copy(), moving.path, kind)


def _displaced_coords(
    matrix: np.ndarray, field: np.ndarray | torch.Tensor, shape: Sequence[int], device: str | torch.device
) -> torch.Tensor:
    """Moving voxel coordinates of ``x + field(x)`` for every fixed voxel ``x``."""
    ndim = len(shape)
    field = torch.as_tensor(field, dtype=torch.float32, device=device)
    points = spatial.identity_grid(shape, device) + (field if field.dim() == ndim + 2 else field[None])
    m = torch.as_tensor(matrix, dtype=torch.float32, device=device)
    mapped = m[:ndim, :ndim] @ points.reshape(ndim, -1) + m[:ndim, ndim:]
    return mapped.reshape(1, ndim, *shape)
