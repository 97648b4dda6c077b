"""Spatial transforms on tensors: one code path for 2D and 3D.

Coordinate domains used throughout voxreg (see docs/conventions.md):

- **voxel coordinates**: a point along array axis ``d`` runs from ``0`` to ``S_d - 1``;
  voxel centres sit on integers. Tensors are ``(N, C, *spatial)`` float32.
- **displacement field** ``u``: shape ``(N, ndim, *spatial)``, in voxels of the fixed
  grid, channel ``d`` = displacement along array axis ``d``. Warping samples the
  moving image at ``x + u(x)``: ``warped(x) = moving(x + u(x))``.
- **normalised coordinates** (``torch.nn.functional.grid_sample`` with
  ``align_corners=True``): ``-1`` at voxel ``0``, ``+1`` at voxel ``S-1``, with the
  last grid dimension in *reversed* axis order (x = last array axis). Only
  :func:`voxel_to_normalized` knows about this.
- **world coordinates** (RAS mm) belong to :mod:`voxreg.io`; this module never
  touches files or affines of images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Interpolation = Literal["linear", "nearest"]
Padding = Literal["border", "zeros"]


def spatial_ndim(tensor: Tensor) -> int:
    """Number of spatial dimensions of an ``(N, C, *spatial)`` tensor (2 or 3)."""
    ndim = tensor.dim() - 2
    if ndim not in (2, 3):
        raise ValueError(f"expected a (N, C, H, W) or (N, C, D, H, W) tensor, got shape {tuple(tensor.shape)}")
    return ndim


# Cached constants are built with inference mode off: a tensor made under torch.inference_mode
# (e.g. the first call from VoxelMorph.register) must stay usable by later autograd code.


@lru_cache(maxsize=16)
@torch.inference_mode(False)
def _cached_identity(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def identity_grid(
    shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Voxel coordinates of every voxel, shape ``(1, ndim, *shape)`` (cached per shape up to
    :data:`CACHE_MAX_VOXELS` voxels)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) > CACHE_MAX_VOXELS:  # built afresh, not kept (see CACHE_MAX_VOXELS)
        return _cached_identity.__wrapped__(shape, device, dtype)
    return _cached_identity(shape, device, dtype)


def _normalized_identity_rows(shape: tuple[int, ...], rows: slice, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The rows ``rows`` (first axis) of :func:`_cached_normalized_identity` ``(1, *shape, ndim)``,
    built from the same ramps (the same values) without the rest of the grid."""
    ndim = len(shape)
    part = (rows.stop - rows.start, *shape[1:])
    grid = torch.empty(1, *part, ndim, device=device, dtype=dtype)
    for axis, size in enumerate(shape):
        ramp = torch.arange(size, device=device, dtype=dtype) * torch.tensor(2.0 / max(size - 1, 1), dtype=dtype) - 1.0
        if axis == 0:
            ramp = ramp[rows]
        view = [1] * ndim
        view[axis] = part[axis]
        grid[0, ..., ndim - 1 - axis].copy_(ramp.view(view).expand(part))
    return grid


@lru_cache(maxsize=16)
@torch.inference_mode(False)
def _cached_normalized_identity(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    # filled axis by axis from 1D ramps (the values of voxel_to_normalized(identity_grid(...)),
    # same float ops): no full-size voxel identity or temporaries (a 1 mm brain's grid: ~0.5 GB
    # of fresh memory less, ~1 s less in a fresh process)
    return _normalized_identity_rows(shape, slice(0, shape[0]), device, dtype)


@lru_cache(maxsize=16)
@torch.inference_mode(False)
def _cached_to_normalized(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    ndim = len(shape)
    matrix = torch.zeros(ndim, ndim, device=device, dtype=dtype)
    for axis, size in enumerate(shape):
        matrix[axis, ndim - 1 - axis] = 2.0 / max(size - 1, 1)
    return matrix


#: grids of more voxels than this get their identity built per call, not cached: one cached
#: identity of a 0.7 mm 512x512x300 CT holds 0.9 GB for the rest of the process
CACHE_MAX_VOXELS = 16_000_000


def _normalized_identity(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """The normalised identity grid ``(*shape, ndim)`` in grid_sample's layout: cached for
    grids up to :data:`CACHE_MAX_VOXELS` voxels, built afresh (same values) above."""
    if math.prod(shape) <= CACHE_MAX_VOXELS:
        return _cached_normalized_identity(shape, device, dtype)[0]
    return _cached_normalized_identity.__wrapped__(shape, device, dtype)[0]  # same builder, not kept


def field_to_grid(field: Tensor) -> Tensor:
    """grid_sample grid ``(N, *S, ndim)`` of ``x + field(x)`` for a displacement ``field``
    ``(N, ndim, *S)`` in voxels (same as ``voxel_to_normalized(identity + field, S)``).

    One fused multiply-add against an identity cached in grid_sample's layout (normalised,
    reversed axis order, channels last): no flip or permute copy of the field per warp.
    """
    batch, ndim = field.shape[:2]
    shape = tuple(int(s) for s in field.shape[2:])
    voxels = math.prod(shape)
    identity = _normalized_identity(shape, field.device, field.dtype).view(voxels, ndim)
    matrix = _cached_to_normalized(shape, field.device, field.dtype)
    flat = field.reshape(batch, ndim, voxels)
    if batch == 1:
        grid = torch.addmm(identity, flat[0].t(), matrix)
    else:
        grid = torch.baddbmm(
            identity.expand(batch, voxels, ndim), flat.transpose(1, 2), matrix.expand(batch, ndim, ndim)
        )
    return grid.view(batch, *shape, ndim)


def voxel_to_normalized(coords: Tensor, shape: Sequence[int]) -> Tensor:
    """Convert voxel coordinates ``(N, ndim, *S_out)`` of an image of spatial ``shape``
    to a grid_sample grid ``(N, *S_out, ndim)`` (normalised, reversed axis order)."""
    ndim = coords.shape[1]
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], device=coords.device, dtype=coords.dtype)
    normalized = coords * scale.view(1, ndim, *([1] * ndim)) - 1.0
    return normalized.movedim(1, -1).flip(-1)


def normalized_to_voxel(grid: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`voxel_to_normalized`: grid ``(N, *S, ndim)`` -> voxels ``(N, ndim, *S)``."""
    coords = grid.flip(-1).movedim(-1, 1)
    ndim = coords.shape[1]
    scale = torch.tensor([max(s - 1, 1) / 2.0 for s in shape], device=grid.device, dtype=grid.dtype)
    return (coords + 1.0) * scale.view(1, ndim, *([1] * ndim))


# below this many sampled points a grid_sample call is not split (thread start-up dominates)
_SPLIT_MIN_POINTS = 1 << 15


def grid_sample(image: Tensor, grid: Tensor, padding: Padding = "border") -> Tensor:
    """``F.grid_sample`` (linear, ``align_corners=True``) of a batch-1 image on CPU, split
    into one batch entry per torch thread along the grid's first axis: torch's CPU kernel
    parallelises over the batch only, so a single image used one core (measured: a 1 mm
    brain's full-resolution warp with its backward 268 -> 176 ms on 2 cores)."""
    parts = torch.get_num_threads()
    if image.device.type != "cpu" or image.shape[0] != 1 or parts < 2 or grid[0, ..., 0].numel() < _SPLIT_MIN_POINTS:
        return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding, align_corners=True)
    rows = grid.shape[1]
    pad = (-rows) % parts
    if pad:
        grid = torch.cat([grid, grid[:, -1:].expand(1, pad, *grid.shape[2:])], dim=1)
    split = grid.reshape(parts, (rows + pad) // parts, *grid.shape[2:])
    out = F.grid_sample(
        image.expand(parts, *image.shape[1:]), split, mode="bilinear", padding_mode=padding, align_corners=True
    )
    out = out.transpose(0, 1).reshape(1, image.shape[1], rows + pad, *out.shape[3:])
    return out[:, :, :rows] if pad else out


def sample(image: Tensor, coords: Tensor, mode: Interpolation = "linear", padding: Padding = "border") -> Tensor:
    """Sample ``image`` ``(N, C, *S_in)`` at voxel coordinates ``coords`` ``(N, ndim, *S_out)``.

    Linear interpolation is bilinear/trilinear; ``nearest`` is for label maps and is exact
    for any dtype (:func:`sample_nearest`). ``padding='border'`` repeats edge values outside
    the image, ``'zeros'`` fills 0. Integer images are always sampled with nearest and keep
    their dtype and values.
    """
    ndim = spatial_ndim(image)
    if coords.shape[1] != ndim:
        raise ValueError(f"coords have {coords.shape[1]} channels for a {ndim}D image")
    if mode == "nearest" or not torch.is_floating_point(image):
        return sample_nearest(image, coords, padding)
    if coords.shape[0] != image.shape[0]:
        coords = coords.expand(image.shape[0], *coords.shape[1:])
    grid = voxel_to_normalized(coords, image.shape[2:])
    return grid_sample(image, grid, padding)


def mapped_points(
    matrix: np.ndarray,
    shape: Sequence[int],
    field: Tensor | None = None,
    device: torch.device | str | None = None,
    first: int | Sequence[int] = 0,
) -> Tensor:
    """``matrix @ [x + field(x), 1]`` for every voxel ``x`` of a grid of ``shape`` (``field``
    ``(1, ndim, *shape)`` in voxels, or None), as ``(rows, voxels)`` float32 for the first
    ``rows <= ndim`` rows of ``matrix``: one ``addmm`` (no coordinate, flip or permute copies of
    a full-size grid). ``first``: the grid is the slab of a larger one starting at that index
    of the first axis, or the box of a larger one starting at those indices (one per axis);
    the same float32 values as for those voxels of the whole grid."""
    ndim = len(shape)
    device = field.device if field is not None else torch.device(device or "cpu")
    rows = np.asarray(matrix, dtype=np.float64)[:ndim]
    linear = torch.as_tensor(rows[:, :ndim].copy(), dtype=torch.float32, device=device)
    offset = torch.as_tensor(rows[:, ndim:].copy(), dtype=torch.float32, device=device)
    points = identity_grid(shape, device).reshape(ndim, -1)
    starts = [int(first)] if isinstance(first, int | np.integer) else [int(v) for v in first]
    if any(starts):
        points = points.clone()
        for axis, start in enumerate(starts):
            points[axis] += start
    if field is not None:
        points = points + field.reshape(ndim, -1)
    return torch.addmm(offset, linear, points)


def sample_displaced(
    image: Tensor,
    matrix: np.ndarray,
    field: Tensor | None,
    padding: Padding = "border",
    shape: Sequence[int] | None = None,
) -> Tensor:
    """Linear samples of ``image`` ``(1, C, *S_in)`` at the voxels ``matrix @ [x + field(x), 1]``
    for every voxel ``x`` of the displacement ``field`` ``(1, ndim, *S)`` (or of a grid of
    ``shape`` at ``matrix @ [x, 1]`` when ``field`` is None), e.g. an affine voxel map after a
    deformable field: :func:`sample` of those coordinates, with grid_sample's normalisation
    folded into ``matrix``, so :func:`mapped_points` makes the grid straight in grid_sample's
    layout (its transpose, a view). The output is filled slab by slab (:func:`first_axis_slabs`):
    the coordinates of one slab at a time, not of the whole grid."""
    ndim = spatial_ndim(image)
    shape = tuple(int(s) for s in (field.shape[2:] if field is not None else shape or ()))
    to_grid = np.eye(ndim + 1)
    sizes = np.asarray(image.shape[2:], dtype=np.float64)
    to_grid[:ndim, :ndim] = np.diag(2.0 / np.maximum(sizes - 1.0, 1.0))
    to_grid[:ndim, ndim] = -1.0
    reversed_rows = (to_grid @ np.asarray(matrix, dtype=np.float64))[:ndim][::-1]  # grid_sample's axis order
    box = reached_box(image, matrix, field, shape) if padding == "zeros" else None
    out = (image.new_empty if box is None else image.new_zeros)((image.shape[0], image.shape[1], *shape))
    for region, slab in box_slabs(box, shape):
        part = None if field is None else field[(slice(None), slice(None), *region)]
        grid = mapped_points(reversed_rows, slab, part, image.device, first=[r.start for r in region])
        out[(slice(None), slice(None), *region)] = grid_sample(
            image, grid.t().reshape(1, *slab, ndim).to(image.dtype), padding
        )
    return out


def box_slabs(box: tuple[slice, ...] | None, shape: Sequence[int]) -> list[tuple[tuple[slice, ...], tuple[int, ...]]]:
    """(region, its shape) of each slab (:func:`first_axis_slabs`) of ``box`` in a grid of
    ``shape`` (the whole grid when None; nothing for an empty box): what a slab-wise sampler
    fills, the rest of a :func:`reached_box` crop being 0."""
    box = box if box is not None else tuple(slice(0, int(n)) for n in shape)
    inner = tuple(b.stop - b.start for b in box)
    if 0 in inner:
        return []
    return [
        ((slice(box[0].start + rows.start, box[0].start + rows.stop), *box[1:]), (rows.stop - rows.start, *inner[1:]))
        for rows in first_axis_slabs(inner)
    ]


def reached_box(
    image: Tensor, matrix: np.ndarray, field: Tensor | None, shape: Sequence[int]
) -> tuple[slice, ...] | None:
    """The box of the output grid ``shape`` outside which every zero-padded linear (or
    nearest) sample of ``image`` ``(N, C, *S_in)`` at ``matrix @ [x + field(x), 1]`` is exactly
    0, or None when that box is the whole grid. A sample reads the voxels within one voxel of
    its point, so a point outside the image's nonzero voxels' box widened by one voxel reads
    zeros only; the output voxels whose point can land inside are those of that box mapped
    back through ``matrix`` and widened by the field's largest displacement per axis (+1
    voxel for rounding). On 1 mm Mindboggle brains the box is 61-66 % of the grid. The
    check is skipped (None) when no face of the image is all zero, or the field is not finite."""
    ndim = len(shape)
    sizes = tuple(int(n) for n in image.shape[2:])
    if not any(not bool(image.select(2 + axis, index).any()) for axis in range(ndim) for index in (0, sizes[axis] - 1)):
        return None  # no zero margin (e.g. a head with noise in the air)
    occupied = image.ne(0).reshape(-1, *sizes).any(0)
    spans = []
    for axis in range(ndim):
        found = torch.nonzero(occupied.any(dim=tuple(a for a in range(ndim) if a != axis))).reshape(-1)
        if found.numel() == 0:
            return tuple(slice(0, 0) for _ in shape)  # an all-zero image: every sample is 0
        spans.append((int(found[0]) - 1.0, int(found[-1]) + 1.0))
    reach = np.zeros(ndim)
    if field is not None:
        reach = field.detach().abs().reshape(field.shape[1], -1).amax(dim=1).double().cpu().numpy()
        if not np.all(np.isfinite(reach)):
            return None
    corners = np.array(np.meshgrid(*spans, indexing="ij")).reshape(ndim, -1)
    inverse = np.linalg.inv(np.asarray(matrix, dtype=np.float64))
    back = inverse[:ndim, :ndim] @ corners + inverse[:ndim, ndim:]
    low = np.floor(back.min(axis=1) - reach - 1.0)
    high = np.ceil(back.max(axis=1) + reach + 1.0)
    box = tuple(slice(int(np.clip(lo, 0, n)), int(np.clip(hi + 1, 0, n))) for lo, hi, n in zip(low, high, shape))
    if all(b.start == 0 and b.stop == n for b, n in zip(box, shape)):
        return None
    return tuple(b if b.stop > b.start else slice(0, 0) for b in box)


#: output voxels per slab of the slab-wise samplers: the temporaries (coordinates, gathers) of
#: one slab instead of several grid-sized ones (a 1 mm brain's field: 126 MB each), i.e. less
#: fresh memory per process, which the page faults of a fresh process make as dear as compute
SLAB_VOXELS = 1 << 20


def first_axis_slabs(shape: Sequence[int], voxels: int | None = None) -> list[slice]:
    """Consecutive slices of the first axis of ``shape`` covering it, each of about ``voxels``
    voxels (:data:`SLAB_VOXELS` by default; at least one row of the axis)."""
    if not shape:
        return [slice(0, 0)]
    row = max(math.prod(int(s) for s in shape[1:]), 1)
    step = max(1, (SLAB_VOXELS if voxels is None else int(voxels)) // row)
    return [slice(start, min(start + step, int(shape[0]))) for start in range(0, int(shape[0]), step)] or [slice(0, 0)]


def shift_first_axis(matrix: np.ndarray, start: int) -> np.ndarray:
    """The rows of ``matrix`` (``(rows, ndim + 1)``, acting on ``[x, 1]``) for points whose first
    voxel coordinate is counted from ``start``: ``shifted @ [x, 1] == matrix @ [x + start e0, 1]``."""
    shifted = np.array(matrix, dtype=np.float64, copy=True)
    shifted[:, -1] += start * shifted[:, 0]
    return shifted


def sample_axes(image: Tensor, axis_coords: Sequence[Tensor]) -> Tensor:
    """Linear samples of ``image`` ``(N, C, *S_in)`` at the grid of per-axis voxel
    coordinates ``axis_coords`` (one 1D tensor per spatial axis), zero outside the image, as
    :func:`sample` with ``padding='zeros'`` gives for an axis-aligned grid: one separable
    pass per axis (two gathers and a lerp) instead of a gather of every corner per voxel.
    The passes go from the last axis to the first, so the largest gathers copy whole
    contiguous slabs (measured 2x faster than first-to-last for a 1 mm brain's field)."""
    out = image
    ndim = spatial_ndim(image)
    for axis in reversed(range(ndim)):
        coords = axis_coords[axis]
        dim, size = 2 + axis, out.shape[2 + axis]
        pad = [0] * (2 * ndim)
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = 1
        padded = F.pad(out, pad)  # a zero on each side: index i of the image is i + 1 here
        shifted = (coords.to(out.dtype) + 1.0).clamp(0.0, size + 1.0)
        low = shifted.floor().clamp(max=size)
        weight = (shifted - low).view([-1 if d == dim else 1 for d in range(out.dim())])
        out = _lerp_gathered(padded, dim, low.long(), weight)
    return out


def _lerp_gathered(padded: Tensor, dim: int, low: Tensor, weight: Tensor) -> Tensor:
    """``lerp(padded[low], padded[low + 1], weight)`` along ``dim``, written into the output a
    chunk of indices at a time (two chunk-sized gathers, not two output-sized ones)."""
    shape = list(padded.shape)
    shape[dim] = low.numel()
    out = padded.new_empty(shape)
    per_index = max(math.prod(shape) // max(low.numel(), 1), 1)
    step = max(1, SLAB_VOXELS // per_index)
    for start in range(0, low.numel(), step):
        index = low[start : start + step]
        torch.lerp(
            padded.index_select(dim, index),
            padded.index_select(dim, index + 1),
            weight.narrow(dim, start, index.numel()),
            out=out.narrow(dim, start, index.numel()),
        )
    return out


def sample_nearest(image: Tensor, coords: Tensor, padding: Padding = "zeros") -> Tensor:
    """Nearest-neighbour sampling by rounding ``coords`` ``(N, ndim, *S_out)`` and gathering
    from ``image`` ``(N, C, *S_in)`` in its own dtype: exact for any integer value (no float
    round trip). Outside the grid (and at non-finite coordinates): 0 with ``padding='zeros'``,
    the nearest edge voxel with ``'border'``. One code path for 2D and 3D."""
    ndim = spatial_ndim(image)
    if coords.shape[1] != ndim:
        raise ValueError(f"coords have {coords.shape[1]} channels for a {ndim}D image")
    batch, channels = image.shape[:2]
    if coords.shape[0] != batch:
        coords = coords.expand(batch, *coords.shape[1:])
    out_shape = coords.shape[2:]
    sizes = image.shape[2:]
    # one axis at a time, rounding in the coordinates' own dtype: float32 -> float64 is exact,
    # so the same integers, and no full-size float copy of the coordinates (peak memory);
    # a non-finite coordinate becomes -1, outside the grid
    valid = torch.ones((batch, *out_shape), dtype=torch.bool, device=image.device)
    flat = torch.zeros((batch, *out_shape), dtype=torch.long, device=image.device)
    for axis, size in enumerate(sizes):
        index = torch.round(torch.nan_to_num(coords[:, axis], nan=-1.0, posinf=-1.0, neginf=-1.0))
        index = index.clamp_(-1, size).long()
        valid &= (index >= 0) & (index < size)
        flat.mul_(size).add_(index.clamp_(0, size - 1))
    values = torch.gather(
        image.reshape(batch, channels, -1), 2, flat.reshape(batch, 1, -1).expand(batch, channels, -1)
    ).reshape(batch, channels, *out_shape)
    if padding == "zeros":
        values = torch.where(valid[:, None], values, torch.zeros((), dtype=image.dtype, device=image.device))
    return values


def warp(image: Tensor, field: Tensor, mode: Interpolation = "linear", padding: Padding = "border") -> Tensor:
    """Warp ``image`` ``(N, C, *S)`` by a displacement ``field`` ``(N, ndim, *S_fixed)`` in
    voxels: ``out(x) = image(x + field(x))``. The output lives on the field's grid."""
    ndim = spatial_ndim(image)
    if field.shape[1] != ndim:
        raise ValueError(f"field has {field.shape[1]} channels for a {ndim}D image")
    if mode == "nearest" or not torch.is_floating_point(image) or field.dtype != image.dtype:
        coords = identity_grid(field.shape[2:], field.device, field.dtype) + field
        return sample(image, coords, mode, padding)
    if field.shape[0] != image.shape[0]:
        field = field.expand(image.shape[0], *field.shape[1:])
    tracked = torch.is_grad_enabled() and (image.requires_grad or field.requires_grad)
    if not tracked and field.shape[0] == 1 and math.prod(field.shape[2:]) > SLAB_VOXELS:
        return _warp_in_slabs(image, field, padding)
    return grid_sample(image, field_to_grid(field), padding)


def _warp_in_slabs(image: Tensor, field: Tensor, padding: Padding) -> Tensor:
    """:func:`warp` (linear, batch 1, no autograd) a slab of the first axis at a time: the
    grid of one slab instead of the whole field's and no cached identity of the whole grid
    (a 1 mm brain: 126 MB each), the same bits (:func:`field_to_grid` per slab)."""
    ndim = spatial_ndim(field)
    shape = tuple(int(s) for s in field.shape[2:])
    matrix = _cached_to_normalized(shape, field.device, field.dtype)
    out = image.new_empty((1, image.shape[1], *shape))
    for rows in first_axis_slabs(shape):
        identity = _normalized_identity_rows(shape, rows, field.device, field.dtype)
        flat = field[:, :, rows].reshape(ndim, -1)
        grid = torch.addmm(identity.view(-1, ndim), flat.t(), matrix)
        out[:, :, rows] = grid_sample(image, grid.view(1, *identity.shape[1:]), padding)
    return out


def warp_at(image: Tensor, field: Tensor, index: Tensor) -> Tensor:
    """:func:`warp` (linear, border padding) evaluated only at the voxels ``index`` (flat
    indices into the field's grid, batch 1): values ``(1, C, len(index))``. The cost (and
    memory) scales with ``len(index)``, not with the grid: the indexed voxels' coordinates are
    unravelled from ``index``, no identity grid of the whole field is built."""
    ndim = spatial_ndim(field)
    shape = tuple(int(s) for s in field.shape[2:])
    voxels = math.prod(shape)
    matrix = _cached_to_normalized(shape, field.device, field.dtype)
    displacement = field.reshape(ndim, voxels).index_select(1, index)
    grid = torch.addmm(_normalized_coords(index, shape, field.dtype), displacement.t(), matrix)
    grid = grid.view(1, -1, *([1] * (ndim - 1)), ndim)
    return grid_sample(image, grid).reshape(1, image.shape[1], -1)


def _normalized_coords(index: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """grid_sample coordinates ``(len(index), ndim)`` (normalised, reversed axis order) of the
    voxels at flat ``index`` of a grid of ``shape``: the rows of the normalised identity."""
    columns, rest = [], index
    for size in reversed(shape):
        columns.append((rest % size).to(dtype) * (2.0 / max(size - 1, 1)) - 1.0)
        rest = torch.div(rest, size, rounding_mode="floor")
    return torch.stack(columns, dim=1)


def compose(outer: Tensor, inner: Tensor) -> Tensor:
    """Displacement of the composition, such that
    ``warp(warp(M, outer), inner) == warp(M, compose(outer, inner))``:
    ``u(x) = inner(x) + outer(x + inner(x))``."""
    return inner + warp(outer, inner)


def integrate_velocity(velocity: Tensor, steps: int = 7) -> Tensor:
    """Integrate a stationary velocity field by scaling and squaring.

    The velocity is scaled by ``2**-steps`` and composed with itself ``steps`` times;
    the result is a diffeomorphic displacement field in the same voxel units.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    field = velocity / (2**steps)
    for _ in range(steps):
        field = field + warp(field, field)
    return field


def resize_field(field: Tensor, shape: Sequence[int]) -> Tensor:
    """Resample a displacement field to a new grid ``shape`` covering the same extent,
    rescaling its values so they stay in voxels of the new grid."""
    ndim = spatial_ndim(field)
    shape = tuple(int(s) for s in shape)
    if tuple(field.shape[2:]) == shape:
        return field
    mode = "bilinear" if ndim == 2 else "trilinear"
    resized = F.interpolate(field, size=shape, mode=mode, align_corners=True)
    factors = [(new - 1) / max(old - 1, 1) for new, old in zip(shape, field.shape[2:])]
    scale = torch.tensor(factors, device=field.device, dtype=field.dtype)
    # in place: the interpolation's backward does not need its output (one field-sized copy less)
    return resized.mul_(scale.view(1, ndim, *([1] * ndim)))


def gaussian_blur(image: Tensor, sigmas: Sequence[float]) -> Tensor:
    """Separable Gaussian blur of ``(N, C, *S)`` with per-axis sigmas in voxels (truncated at
    2.5 sigma, edges replicated; axes with sigma < 0.2 untouched). Each pass is a weighted sum
    of a few shifted views: several times faster than ``conv3d`` on CPU."""
    ndim = image.dim() - 2
    out = image
    for axis, sigma in enumerate(sigmas):
        if sigma < 0.2:
            continue
        radius = int(math.ceil(2.5 * sigma))
        taps = np.arange(-radius, radius + 1, dtype=np.float64)
        kernel = np.exp(-0.5 * (taps / sigma) ** 2)
        kernel /= kernel.sum()
        pad = [0] * (2 * ndim)
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = radius
        padded = F.pad(out, pad, mode="replicate")
        size = out.shape[2 + axis]
        blurred = padded.narrow(2 + axis, 0, size) * float(kernel[0])
        for index in range(1, kernel.size):
            blurred.add_(padded.narrow(2 + axis, index, size), alpha=float(kernel[index]))
        out = blurred
    return out


def block_average(tensor: Tensor, affine: np.ndarray, factors: Sequence[int]) -> tuple[Tensor, np.ndarray]:
    """Block average of ``(N, C, *S)`` by integer ``factors`` per spatial axis (partial blocks
    at the far edges averaged over what they hold) and the voxel -> world ``affine`` (square,
    reduced or 4x4) of the result: each block's centre."""
    if all(k == 1 for k in factors):
        return tensor, affine
    pool = F.avg_pool2d if tensor.dim() == 4 else F.avg_pool3d
    pooled = pool(tensor, tuple(int(k) for k in factors), stride=tuple(int(k) for k in factors), ceil_mode=True)
    ndim = len(factors)
    scale = np.eye(np.asarray(affine).shape[0])
    scale[range(ndim), range(ndim)] = np.asarray(factors, dtype=np.float64)
    scale[:ndim, -1] = (np.asarray(factors, dtype=np.float64) - 1.0) / 2.0
    return pooled, np.asarray(affine, dtype=np.float64) @ scale


def box_variance(factors: Sequence[int], spacing: Sequence[float] | np.ndarray) -> np.ndarray:
    """Variance per axis (in units of ``spacing`` squared) of a block average by ``factors``
    of voxels of size ``spacing``: what :func:`block_average` adds to a Gaussian's sigma^2."""
    return (np.asarray(factors, dtype=np.float64) ** 2 - 1.0) / 12.0 * np.asarray(spacing, dtype=np.float64) ** 2


def upsample_field(field: Tensor, factor: int) -> Tensor:
    """A displacement field of a grid whose voxels are ``factor``-wide blocks of a finer grid
    (block averages, as ``F.interpolate(mode="area")`` makes them), resampled linearly onto the
    finer grid and in its voxels."""
    if factor == 1:
        return field
    mode = "bilinear" if spatial_ndim(field) == 2 else "trilinear"
    return F.interpolate(field, scale_factor=factor, mode=mode, align_corners=False) * factor


def block_mean(image: Tensor, factor: int) -> Tensor:
    """Means of ``factor``-wide blocks of an ``(N, C, *S)`` image (the coarse grid of
    :func:`upsample_field`)."""
    if factor == 1:
        return image
    return F.interpolate(image, scale_factor=1 / factor, mode="area")


def resize_image(image: Tensor, shape: Sequence[int]) -> Tensor:
    """Linearly resample an ``(N, C, *S)`` image to ``shape`` over the same extent."""
    ndim = spatial_ndim(image)
    if tuple(image.shape[2:]) == tuple(shape):
        return image
    mode = "bilinear" if ndim == 2 else "trilinear"
    return F.interpolate(image, size=tuple(int(s) for s in shape), mode=mode, align_corners=True)


def spatial_gradient(field: Tensor) -> Tensor:
    """Central-difference derivatives ``d field[c] / d axis[k]``, shape ``(N, C, ndim, *S)``
    (one-sided at the borders)."""
    ndim = spatial_ndim(field)
    grads = torch.gradient(field, dim=tuple(range(2, 2 + ndim)))
    return torch.stack(grads, dim=2)


# voxels per slab of the first axis when a large field's Jacobian is computed without autograd
_JACOBIAN_SLAB_VOXELS = 1 << 21


def jacobian_determinant(field: Tensor) -> Tensor:
    """Determinant of the Jacobian of ``x -> x + field(x)``, shape ``(N, *S)``.

    Values <= 0 mark folding; 1 means volume preserved. Without a gradient to track, a large
    field goes slab by slab along its first axis (:func:`jacobian_determinant_slabs`): the
    same values with a few slabs' worth of intermediates (a 1 mm brain's field: +1.6 GB ->
    +0.4 GB).
    """
    if torch.is_grad_enabled() and field.requires_grad:
        return _jacobian_determinant(field)
    out = field.new_empty((field.shape[0], *field.shape[2:]))
    for start, stop, det in jacobian_determinant_slabs(field):
        out[:, start:stop] = det
    return out


def jacobian_determinant_slabs(field: Tensor) -> Iterator[tuple[int, int, Tensor]]:
    """:func:`jacobian_determinant` of a field without gradient, as ``(start, stop, det)`` slabs
    along the first spatial axis (``det`` ``(N, stop - start, *S[1:])``; each slab computed
    with one extra row either side, so central differences see the same neighbours): the
    whole field when it is small. Streaming the slabs (e.g. into statistics) never holds the
    whole determinant."""
    size = field.shape[2]
    per_row = max(field.numel() // max(size, 1), 1)
    rows = max(_JACOBIAN_SLAB_VOXELS // per_row, 1)
    if rows >= size:
        yield 0, size, _jacobian_determinant(field)
        return
    for start in range(0, size, rows):
        stop = min(start + rows, size)
        low, high = max(start - 1, 0), min(stop + 1, size)
        yield start, stop, _jacobian_determinant(field[:, :, low:high])[:, start - low : stop - low]


def _jacobian_determinant(field: Tensor) -> Tensor:
    """:func:`jacobian_determinant` of the whole field at once: the same products in the same
    order as the cofactor expansion of ``spatial_gradient(field) + I``, taken straight from
    ``torch.gradient``'s contiguous outputs (no stacked, shifted or strided copies: a 1 mm
    brain's field 0.19 -> 0.12-0.15 s; differentiable as well)."""
    ndim = spatial_ndim(field)
    grads = torch.gradient(field, dim=tuple(range(2, 2 + ndim)))  # grads[k][:, r] = d field[r] / d axis k
    for k in range(ndim):
        grads[k][:, k] += 1.0
    rows = [[grads[k][:, r] for k in range(ndim)] for r in range(ndim)]
    if ndim == 2:
        (a, b), (c, d) = rows
        return a * d - b * c
    (a, b, c), (d, e, f), (g, h, i) = rows
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def matrix_to_field(matrix: Tensor, shape: Sequence[int]) -> Tensor:
    """Displacement field ``(1, ndim, *shape)`` of a voxel-space affine ``matrix``
    ``(ndim+1, ndim+1)`` mapping output voxel ``x`` to input voxel ``M @ [x, 1]``."""
    ndim = len(shape)
    grid = identity_grid(shape, matrix.device, matrix.dtype)
    flat = grid.reshape(ndim, -1)
    mapped = matrix[:ndim, :ndim] @ flat + matrix[:ndim, ndim:]
    return (mapped - flat).reshape(1, ndim, *shape)


def invert_field(field: Tensor, iterations: int = 30) -> Tensor:
    """Numerical inverse of a displacement field by fixed-point iteration
    ``v(x) = -u(x + v(x))`` (converges for smooth, non-folding fields)."""
    inverse = -field
    for _ in range(iterations):
        inverse = -warp(field, inverse)
    return inverse


def invert_displacement(
    field: Tensor, iterations: int = 2, coarse_iterations: int = 12, initial: Tensor | None = None
) -> Tensor:
    """Inverse ``v`` of the map ``x -> x + field(x)`` (``field`` ``(N, ndim, *S)`` in voxels),
    so that ``y + v(y)`` undoes it: the fixed point of ``v(y) = -field(y + v(y))``, iterated
    with grid_sample (exact for a constant shift).

    ``coarse_iterations`` damped steps (half of each update) run first on the field resized to
    half resolution (8x fewer voxels in 3D); damping lets the iteration converge also where
    the map stretches or squeezes by more than 2x, where plain steps oscillate. Their result,
    resized back, starts ``iterations`` plain steps at full resolution, each of which shrinks
    the remaining error by about the field's local gradient. Cost: about ``iterations + 1 +
    coarse_iterations / 8`` full-resolution warps of the field. ``initial`` (an approximate
    inverse, e.g. a negated velocity integrated) replaces the coarse stage."""
    if iterations < 0 or coarse_iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations} and {coarse_iterations}")
    spatial_ndim(field)
    if initial is not None:
        if initial.shape != field.shape:
            raise ValueError(f"initial inverse {tuple(initial.shape)} does not match the field {tuple(field.shape)}")
        return _fixed_point_inverse(field, initial, iterations)
    shape = tuple(int(s) for s in field.shape[2:])
    coarse_shape = tuple(max(2, (s + 1) // 2) for s in shape)
    if coarse_iterations and coarse_shape != shape:
        coarse = resize_field(field, coarse_shape)
        inverse = resize_field(_fixed_point_inverse(coarse, -coarse, coarse_iterations, step=0.5), shape)
    else:
        inverse = -field
    return _fixed_point_inverse(field, inverse, iterations)


def _fixed_point_inverse(field: Tensor, inverse: Tensor, iterations: int, step: float = 1.0) -> Tensor:
    """``iterations`` steps of ``v <- v + step * (-field(y + v(y)) - v)`` from ``inverse``."""
    for _ in range(iterations):
        target = -warp(field, inverse)
        inverse = target if step == 1.0 else torch.lerp(inverse, target, step)
    return inverse


def fit_inverse(
    field: Tensor,
    inverse: Tensor,
    index: Tensor,
    sweeps: int = 4,
    damping: float = 0.5,
    inplace: bool = False,
    weight: Tensor | None = None,
) -> Tensor:
    """``inverse`` (batch 1) corrected so that ``inverse(x + field(x)) = -field(x)`` holds, in
    the least-squares sense of linear interpolation, at the voxels ``index`` (flat indices):
    ``sweeps`` damped Jacobi sweeps, each node moving by the interpolation-weighted sum of the
    misfits it takes part in over its total weight + ``damping`` (the splat is the adjoint of
    the sampling: grid_sample's backward). Nodes no indexed point reaches keep their value. This is the
    scattered-data view of inversion (ITK's InverseDisplacementFieldImageFilter fits point
    pairs ``x + field(x) -> x``); from a fixed-point inverse (:func:`invert_displacement`) it
    reduces the residual where the map stretches strongly and the fixed-point iteration,
    whose error shrinks by the local gradient per step, cannot (tests/test_inverse.py).
    ``inplace``: ``inverse`` itself is corrected and returned (no full-size copy); ``weight``:
    :func:`mapped_weight` of ``field`` and ``index`` when the caller has it already (it is
    changed in place)."""
    if sweeps < 0 or damping <= 0:
        raise ValueError(f"sweeps must be >= 0 and damping > 0, got {sweeps} and {damping}")
    ndim = spatial_ndim(field)
    target = -field.reshape(ndim, -1).index_select(1, index)
    grid = _mapped_grid(field, index)

    def sample(image: Tensor) -> Tensor:
        return grid_sample(image, grid).reshape(image.shape[1], -1)

    fitted = inverse.detach() if inplace else inverse.detach().clone()
    weight = (_splat(torch.ones_like(target[:1]), grid, field) if weight is None else weight).add_(damping)
    for _ in range(sweeps):
        fitted += _splat(target - sample(fitted), grid, field).div_(weight)
    return fitted


def _mapped_grid(field: Tensor, index: Tensor) -> Tensor:
    """grid_sample's grid (normalised, batch 1) of the mapped voxels ``x + field(x)`` at the
    flat voxel indices ``index``."""
    ndim = spatial_ndim(field)
    shape = tuple(int(s) for s in field.shape[2:])
    displacement = field.reshape(ndim, -1).index_select(1, index)
    matrix = _cached_to_normalized(shape, field.device, field.dtype)
    grid = torch.addmm(_normalized_coords(index, shape, field.dtype), displacement.t(), matrix)
    return grid.view(1, -1, *([1] * (ndim - 1)), ndim)


def _splat(values: Tensor, grid: Tensor, like: Tensor) -> Tensor:
    """grid_sample's adjoint: ``values`` ``(C, len(grid))`` spread onto a grid shaped like
    ``like``'s spatial axes with the linear interpolation weights (its backward: no forward
    pass, no autograd graph), ``(1, C, *S)``."""
    ndim = spatial_ndim(like)
    backward = torch.ops.aten.grid_sampler_3d_backward if ndim == 3 else torch.ops.aten.grid_sampler_2d_backward
    # the backward reads only the input's shape for the input's gradient: a zero-stride stand-in
    nodes = torch.zeros((), dtype=like.dtype, device=like.device).expand(1, values.shape[0], *like.shape[2:])
    spread, _ = backward(values.reshape(1, -1, *grid.shape[1:-1]), nodes, grid, 0, 1, True, [True, False])
    return spread


def mapped_weight(field: Tensor, index: Tensor) -> Tensor:
    """Each grid node's total linear-interpolation weight from the mapped voxels ``x + field(x)``
    of the flat voxel indices ``index`` (batch 1): ``(1, 1, *S)``, 0 where none of them falls."""
    ones = torch.ones(1, index.numel(), dtype=field.dtype, device=field.device)
    return _splat(ones, _mapped_grid(field, index), field)


def reached_nodes(field: Tensor, index: Tensor, weight: Tensor | None = None) -> Tensor:
    """Flat indices of the grid nodes between which the mapped voxels ``x + field(x)`` of the
    flat voxel indices ``index`` (batch 1) fall: where an inverse of ``field`` is read when it
    maps those voxels back (the corners linear interpolation weighs); ``weight``:
    :func:`mapped_weight` of the same when the caller has it already."""
    weight = mapped_weight(field, index) if weight is None else weight
    return torch.nonzero(weight.reshape(-1) > 0).squeeze(1)


def _solve_small(jacobian: list[list[Tensor]], rhs: Tensor) -> tuple[Tensor, Tensor]:
    """(solution ``(ndim, N)``, determinant ``(N,)``) of ``N`` 2x2 or 3x3 systems
    ``jacobian[i][j] x_j = rhs_i`` given entrywise, by the adjugate (elementwise: ~10x faster
    than a batched LU for millions of tiny systems). Singular systems give inf/nan: mask them."""
    if len(jacobian) == 2:
        (a, b), (c, d) = jacobian
        det = a * d - b * c
        return torch.stack([d * rhs[0] - b * rhs[1], a * rhs[1] - c * rhs[0]]) / det, det
    (a, b, c), (d, e, f), (g, h, i) = jacobian
    cofactors = [e * i - f * h, c * h - b * i, b * f - c * e]  # the adjugate's first row
    det = a * cofactors[0] + d * cofactors[1] + g * cofactors[2]
    x0 = cofactors[0] * rhs[0] + cofactors[1] * rhs[1] + cofactors[2] * rhs[2]
    x1 = (f * g - d * i) * rhs[0] + (a * i - c * g) * rhs[1] + (c * d - a * f) * rhs[2]
    x2 = (d * h - e * g) * rhs[0] + (b * g - a * h) * rhs[1] + (a * e - b * d) * rhs[2]
    return torch.stack([x0, x1, x2]) / det, det


#: nodes per chunk of :func:`newton_inverse`: its temporaries stay small and are reused by the
#: allocator (one pass over 1.5 M nodes paid page faults for ~20 fresh 18-55 MB arrays)
NEWTON_CHUNK = 1 << 17


def newton_inverse(
    field: Tensor,
    inverse: Tensor,
    nodes: Tensor,
    iterations: int = 2,
    step: float = 0.5,
    max_move: float = 1.0,
    inplace: bool = False,
) -> Tensor:
    """``inverse`` (batch 1) corrected at the flat node indices ``nodes`` so that each node
    ``y`` satisfies ``x + field(x) = y`` at ``x = y + inverse(y)``: ``iterations`` Newton steps
    per node on that equation (the Jacobian ``I + grad field`` by forward differences of
    ``step`` voxels, each move at most ``max_move`` voxels, none where the map folds or nearly
    so, and a move kept only where it shrinks the node's misfit). Unlike the fixed-point
    iteration (:func:`invert_displacement`), whose error shrinks by the field's local gradient
    per step and grows where the map stretches more than 2x, Newton's converges wherever the
    map is locally invertible; the least-squares fit (:func:`fit_inverse`) makes the other
    direction, ``x -> x + field(x) -> back``, consistent at the voxels. Other nodes keep their
    value. Runs over :data:`NEWTON_CHUNK` nodes at a time. ``inplace``: ``inverse`` itself is
    corrected and returned (no full-size copy)."""
    if iterations < 0 or step <= 0 or max_move <= 0:
        raise ValueError(f"need iterations >= 0, step > 0 and max_move > 0, got {iterations}, {step}, {max_move}")
    ndim = spatial_ndim(field)
    corrected = inverse.detach() if inplace else inverse.detach().clone()
    if iterations == 0 or nodes.numel() == 0:
        return corrected
    flat = corrected.reshape(ndim, -1)
    for chunk in nodes.split(NEWTON_CHUNK):
        flat[:, chunk] = _newton_nodes(field, flat.index_select(1, chunk), chunk, iterations, step, max_move)
    return corrected


def _newton_nodes(field: Tensor, given: Tensor, nodes: Tensor, iterations: int, step: float, max_move: float) -> Tensor:
    """:func:`newton_inverse` for one chunk: the corrected inverse ``(ndim, len(nodes))`` at
    ``nodes`` from its values ``given``. The points stay in grid_sample's normalised
    coordinates (no per-sample conversion); the difference probes are sampled in one call."""
    ndim = spatial_ndim(field)
    shape = tuple(int(s) for s in field.shape[2:])
    to_grid = _cached_to_normalized(shape, field.device, field.dtype)  # voxel displacement -> grid_sample's
    to_voxels = torch.linalg.inv(to_grid)  # a scaled permutation
    target = _normalized_coords(nodes, shape, field.dtype)  # (N, ndim), grid_sample's axis order
    found = start = torch.addmm(target, given.t(), to_grid)
    n, tail = nodes.numel(), [1] * (ndim - 1)

    def field_at(points: Tensor) -> Tensor:  # (ndim, len(points)) voxel displacements
        return grid_sample(field, points.view(1, -1, *tail, ndim)).reshape(ndim, -1)

    here = field_at(found)  # u at the current points, (ndim, N)
    misfit = (found - target) @ to_voxels + here.t()  # x + u(x) - y, (N, ndim) voxels
    offsets = to_grid * step  # row j: a step of ``step`` voxels along axis j, normalised
    for _ in range(iterations):
        ahead = field_at(torch.cat([found + offsets[j] for j in range(ndim)])).view(ndim, ndim, n)
        slope = (ahead - here.unsqueeze(1)) / step  # (component, axis, node): forward differences
        jacobian = [[slope[r, c] + (1.0 if r == c else 0.0) for c in range(ndim)] for r in range(ndim)]
        move, det = _solve_small(jacobian, misfit.t())
        move = torch.where(det > 0.05, move, 0.0)
        length = move.square().sum(0).sqrt_().clamp_(min=max_move)
        move = move * (max_move / length)
        candidate = found - move.t() @ to_grid
        there = field_at(candidate)
        candidate_misfit = (candidate - target) @ to_voxels + there.t()
        better = candidate_misfit.square().sum(1) < misfit.square().sum(1)
        found = torch.where(better.unsqueeze(1), candidate, found)
        misfit = torch.where(better.unsqueeze(1), candidate_misfit, misfit)
        here = torch.where(better, there, here)
    return given + ((found - start) @ to_voxels).t()  # a node no step improved keeps its value


def inverse_residual(field: Tensor, inverse: Tensor, index: Tensor | None = None) -> Tensor:
    """Length (voxels) of ``field(x) + inverse(x + field(x))``, how far ``x`` lands from
    itself after the map and its inverse: ``(N, *S)``, or only at the flat voxel indices
    ``index`` (batch 1) as ``(len(index),)`` (:func:`warp_at`: the cost scales with them)."""
    if index is None:
        return vector_length(compose(inverse, field), dim=1)
    ndim = spatial_ndim(field)
    at_index = field.reshape(ndim, -1).index_select(1, index)
    return vector_length(at_index.add_(warp_at(inverse, field, index)[0]), dim=0)


def vector_length(vectors: Tensor, dim: int) -> Tensor:
    """Euclidean length of ``vectors`` along ``dim`` (its components): the square root of the
    summed squares, elementwise (``torch.linalg.vector_norm`` reduces such a short, strided axis
    15-30x slower on CPU: 0.128 against 0.008 s for 1.36 M 3D vectors on one thread; the
    lengths agree to float32 rounding)."""
    return vectors.square().sum(dim).sqrt_()
