"""Reading and writing images, resampling between grids in world space, ITK export.

World coordinates are RAS millimetres (nibabel convention); ``Image.affine`` maps voxel
indices to them. ITK/ANTs use LPS: ``LPS = diag(-1, -1, 1) @ RAS``.
A 2D image is handled as a 3D grid with one slice (its affine is still 4x4).
"""

from __future__ import annotations

import numpy as np
import torch

from voxreg import spatial
from voxreg.image import Image

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _spatial_affine(affine: np.ndarray, ndim: int) -> np.ndarray:
    """The (ndim+1)x(ndim+1)-compatible 4x4 voxel->world map of an ``ndim``-D image."""
    return np.asarray(affine, dtype=np.float64)


def voxel_matrix(fixed_affine: np.ndarray, moving_affine: np.ndarray, ndim: int = 3,
                 world_matrix: np.ndarray | None = None) -> np.ndarray:
    """Matrix ``(ndim+1, ndim+1)`` mapping fixed voxel indices to moving voxel indices.

    ``world_matrix`` (4x4, RAS mm) maps fixed world points to moving world points
    (the affine stage); identity when None.
    """
    world = np.eye(4) if world_matrix is None else np.asarray(world_matrix, dtype=np.float64)
    full = np.linalg.inv(moving_affine) @ world @ fixed_affine
    keep = list(range(ndim)) + [3]
    return full[np.ix_(keep, keep)]


def resample_to(moving: Image, fixed: Image, world_matrix: np.ndarray | None = None,
                nearest: bool | None = None, device: str | torch.device = "cpu") -> Image:
    """Resample ``moving`` onto ``fixed``'s grid in world coordinates.

    Handles different shapes, voxel sizes and orientations. Label maps (integer
    arrays) use nearest neighbour; intensities use linear interpolation and 0 outside.
    The result carries the fixed affine.
    """
    if moving.ndim != fixed.ndim:
        raise ValueError(f"cannot resample a {moving.ndim}D image onto a {fixed.ndim}D grid")
    ndim = fixed.ndim
    matrix = voxel_matrix(fixed.affine, moving.affine, ndim, world_matrix)
    if np.allclose(matrix, np.eye(ndim + 1), atol=1e-6) and moving.shape == fixed.shape:
        return Image(moving.array.copy(), fixed.affine.copy(), moving.path)
    use_nearest = moving.is_label if nearest is None else nearest
    tensor = torch.from_numpy(np.ascontiguousarray(moving.array))[None, None].to(device)
    if not use_nearest and not torch.is_floating_point(tensor):
        tensor = tensor.float()
    coords = spatial.identity_grid(fixed.shape, device) + spatial.matrix_to_field(
        torch.as_tensor(matrix, dtype=torch.float32, device=device), fixed.shape)
    out = spatial.sample(tensor, coords, "nearest" if use_nearest else "linear", padding="zeros")
    return Image(out[0, 0].cpu().numpy(), fixed.affine.copy(), moving.path)
