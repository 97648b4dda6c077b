"""Resampling between grids in world space (one interpolation through the composite transform)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from voxreg.core import spatial
from voxreg.core.errors import VoxregError
from voxreg.core.grid import check_affine, mapped_coords, voxel_matrix
from voxreg.core.image import Image

#: where resampling runs
Device = str | torch.device


def resample_to(
    moving: Image,
    fixed: Image,
    world_matrix: np.ndarray | None = None,
    nearest: bool | None = None,
    device: str | torch.device = "cpu",
    field: np.ndarray | torch.Tensor | None = None,
    copy: bool = True,
) -> Image:
    """Resample ``moving`` onto ``fixed``'s grid in world coordinates.

    Handles different shapes, voxel sizes and orientations. Label maps (integer
    arrays) use nearest neighbour and 0 outside; intensities use linear interpolation and
    ``min(moving minimum, 0)`` outside its field of view (0 for MRI, air for CT in HU).
    ``world_matrix`` maps fixed world points to moving world points (identity when None);
    ``field`` is a displacement in fixed voxels applied first, so a fixed voxel ``x`` samples
    the moving scan at ``world_matrix(fixed_affine (x + field(x)))`` with ONE interpolation.
    The result carries the fixed affine. When ``moving`` already lies on that grid (and no
    ``field``), the result holds a copy of its array, or the array itself when ``copy`` is False
    (for a caller that only reads it: no full-size copy).
    """
    if moving.ndim != fixed.ndim:
        raise VoxregError(
            f"cannot resample the {moving.ndim}D image {moving.name} onto the {fixed.ndim}D grid of {fixed.name}"
        )
    ndim = fixed.ndim
    check_affine(fixed.affine, f"{fixed.path or 'fixed image'}")
    check_affine(moving.affine, f"{moving.path or 'moving image'}")
    if world_matrix is not None:
        check_affine(world_matrix, "the affine transform")
    matrix = voxel_matrix(fixed.affine, moving.affine, ndim, world_matrix)
    if field is None and np.allclose(matrix, np.eye(ndim + 1), atol=1e-6) and moving.shape == fixed.shape:
        return Image(moving.array.copy() if copy else moving.array, fixed.affine.copy(), moving.path, moving.kind)
    use_nearest = moving.is_label if nearest is None else nearest
    displacement = None if field is None else _displacement(field, ndim, device)
    sample = _nearest if use_nearest else _linear
    out = sample(moving.array, matrix, fixed.shape, displacement, device)
    kind = "label" if use_nearest and moving.is_label else None
    return Image(out, fixed.affine.copy(), moving.path, kind)


def _linear(
    array: np.ndarray, matrix: np.ndarray, shape: Sequence[int], displacement: torch.Tensor | None, device: Device
) -> np.ndarray:
    """Linear samples of ``array`` at ``matrix @ (x + displacement(x))`` for the voxels ``x`` of
    a grid of ``shape``, ``min(array minimum, 0)`` outside: the array shifted by that value is
    sampled with zero padding and shifted back (skipped when it is 0, as for most MRI)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)
    low = min(float(tensor.min()), 0.0) if tensor.numel() else 0.0
    if low != 0.0:
        tensor = tensor - low
    sampled = spatial.sample_displaced(tensor, matrix, displacement, padding="zeros", shape=shape)
    if low != 0.0:
        sampled += low
    return sampled[0, 0].cpu().numpy()


# dtypes torch cannot gather in: sampled as int64 and cast back (exact)
_WIDENED = {np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64), np.dtype(np.bool_)}


def _nearest(
    array: np.ndarray, matrix: np.ndarray, shape: Sequence[int], displacement: torch.Tensor | None, device: Device
) -> np.ndarray:
    """Nearest-neighbour samples of ``array`` (as :func:`_linear`) in the array's own dtype
    (exact for every integer value; 0 outside the grid), a slab of the grid at a time
    (:func:`~voxreg.core.spatial.first_axis_slabs`: the coordinates of one slab, not of the
    whole grid)."""
    dtype = array.dtype
    work = array.astype(np.int64) if dtype in _WIDENED else array
    tensor = torch.from_numpy(np.ascontiguousarray(work))[None, None].to(device)
    box = spatial.reached_box(tensor, matrix, displacement, shape) if displacement is not None else None
    out = (torch.empty if box is None else torch.zeros)(tuple(shape), dtype=tensor.dtype, device=tensor.device)
    for region, slab in spatial.box_slabs(box, shape):
        if displacement is None:  # no box: the region is a slab of whole rows
            coords = mapped_coords(spatial.shift_first_axis(matrix, region[0].start), slab, device)
        else:
            part = displacement[(slice(None), slice(None), *region)]
            starts = [r.start for r in region]
            coords = spatial.mapped_points(matrix, slab, part, first=starts).reshape(1, len(shape), *slab)
        out[region] = spatial.sample_nearest(tensor, coords, padding="zeros")[0, 0]
    return out.cpu().numpy().astype(dtype, copy=False)


def _displacement(field: np.ndarray | torch.Tensor, ndim: int, device: str | torch.device) -> torch.Tensor:
    """``field`` as a float32 ``(1, ndim, *S)`` tensor on ``device`` (a batch axis added when missing)."""
    tensor = torch.as_tensor(field, dtype=torch.float32, device=device)
    return tensor if tensor.dim() == ndim + 2 else tensor[None]
