"""The space a network was trained in, and the maps between it and a fixed scan's grid.

A network sees anatomy at the voxel size it was trained at. A checkpoint records its
:class:`ModelSpace` (voxel size, dimension, grid rule, intensity normalisation). At
inference the affine-aligned pair is resampled onto a *model grid*: the fixed scan's axes
(same direction cosines), the model's voxel size, covering the fixed scan's foreground
(plus a margin), each axis a multiple of the network's size multiple. The predicted field
(voxels of the model grid) is mapped back to a displacement in voxels of the fixed grid
through world millimetres, so a shift of ``s`` mm stays ``s`` mm at any voxel size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from voxreg.core import spatial
from voxreg.core.grid import Grid, voxel_spacing

_NORMALISATIONS = ("percentile",)


@dataclass(frozen=True)
class ModelSpace:
    """Where a network runs: isotropic or per-axis ``voxel_size`` (mm), ``ndim``, the grid
    rule (foreground box + ``margin_mm``, each axis a multiple of ``multiple``) and the
    intensity normalisation (robust percentiles to [0, 1])."""

    voxel_size: tuple[float, ...]
    ndim: int = 3
    multiple: int = 16
    margin_mm: float = 8.0
    normalisation: str = "percentile"

    def __post_init__(self) -> None:
        size = tuple(float(v) for v in np.broadcast_to(np.asarray(self.voxel_size, float), (self.ndim,)))
        if self.ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim!r}")
        if not all(math.isfinite(v) and v > 0 for v in size):
            raise ValueError(f"voxel_size must be finite and > 0 mm, got {self.voxel_size!r}")
        if not isinstance(self.multiple, int) or self.multiple < 1:
            raise ValueError(f"multiple must be an int >= 1, got {self.multiple!r}")
        if self.normalisation not in _NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {', '.join(_NORMALISATIONS)}; got {self.normalisation!r}")
        object.__setattr__(self, "voxel_size", size)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (stored in checkpoints)."""
        out = asdict(self)
        out["voxel_size"] = list(self.voxel_size)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpace:
        """Inverse of :meth:`to_dict` (unknown keys refused)."""
        known = {"voxel_size", "ndim", "multiple", "margin_mm", "normalisation"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model-space keys: {', '.join(sorted(unknown))}")
        defaults = cls(voxel_size=(1.0,))
        return cls(
            voxel_size=tuple(data["voxel_size"]),
            ndim=int(data.get("ndim", defaults.ndim)),
            multiple=int(data.get("multiple", defaults.multiple)),
            margin_mm=float(data.get("margin_mm", defaults.margin_mm)),
            normalisation=str(data.get("normalisation", defaults.normalisation)),
        )


def _foreground_bounds(mask: np.ndarray | None, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest voxel index (inclusive) of the mask's nonzero voxels; the whole
    grid when the mask is None or empty."""
    if mask is None or not np.any(mask):
        return np.zeros(len(shape)), np.asarray(shape, dtype=np.float64) - 1
    low, high = [], []
    for axis in range(mask.ndim):  # per axis: which slices hold any voxel (no index arrays)
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        low.append(hits[0])
        high.append(hits[-1])
    return np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)


def model_grid(fixed: Grid, space: ModelSpace, foreground: np.ndarray | None = None) -> Grid:
    """The model grid for a fixed scan: the fixed axes at the model's voxel size, covering the
    foreground box (grown by ``margin_mm``), centred on it, each axis a multiple of
    ``space.multiple`` voxels."""
    if fixed.ndim != space.ndim:
        raise ValueError(f"the model works on {space.ndim}D scans; this scan is {fixed.ndim}D")
    low, high = _foreground_bounds(foreground, fixed.shape)
    spacing = fixed.spacing
    extent_mm = (high - low) * spacing + 2.0 * space.margin_mm
    size = np.maximum(np.ceil(extent_mm / np.asarray(space.voxel_size) / space.multiple), 1) * space.multiple
    centre = (low + high) / 2.0  # fixed voxel index of the box centre
    direction = fixed.affine[:3, : fixed.ndim] / spacing  # unit axis vectors (world)
    step = direction * np.asarray(space.voxel_size)
    affine = np.eye(4)
    affine[:3, : fixed.ndim] = step
    if fixed.ndim == 2:
        affine[:3, 2] = fixed.affine[:3, 2]
    centre_world = fixed.affine[:3, : fixed.ndim] @ centre + fixed.affine[:3, 3]
    affine[:3, 3] = centre_world - step @ ((size - 1) / 2.0)
    return Grid(tuple(int(s) for s in size), affine)


def _linear(grid: Grid) -> np.ndarray:
    """The ``(ndim, ndim)`` voxel -> world linear part of a grid (in-plane for 2D)."""
    return grid.affine[: grid.ndim, : grid.ndim]


def field_to_fixed(field: Tensor, model: Grid, fixed: Grid) -> Tensor:
    """Map a displacement in model-grid voxels ``(1, ndim, *model.shape)`` to one in fixed-grid
    voxels ``(1, ndim, *fixed.shape)`` through world millimetres (linear interpolation;
    zero displacement outside the model grid). Both grids must share their axes' directions
    up to scale, as :func:`model_grid` builds them."""
    ndim = fixed.ndim
    to_world = torch.as_tensor(_linear(model), dtype=field.dtype, device=field.device)
    to_fixed = torch.as_tensor(np.linalg.inv(_linear(fixed)), dtype=field.dtype, device=field.device)
    # a linear map of the vectors commutes with linear interpolation (and keeps zero padding
    # zero): applied on the small model grid, not on the fixed one
    field = ((to_fixed @ to_world) @ field.reshape(ndim, -1)).reshape(field.shape)
    index_map = fixed.voxel_matrix_to(model)
    if np.allclose(index_map[:ndim, :ndim], np.diag(np.diag(index_map[:ndim, :ndim])), atol=1e-9):
        # axis-aligned (as model_grid builds it): separable, a third of the time at 1 mm
        axes = [
            torch.arange(n, device=field.device, dtype=torch.float64) * index_map[axis, axis] + index_map[axis, ndim]
            for axis, n in enumerate(fixed.shape)
        ]
        return spatial.sample_axes(field, axes)
    return spatial.sample(field, _fixed_in_model_coords(model, fixed, field.device), "linear", padding="zeros")


def _fixed_in_model_coords(model: Grid, fixed: Grid, device: torch.device) -> Tensor:
    """Model-grid voxel coordinates ``(1, ndim, *fixed.shape)`` of every fixed voxel."""
    from voxreg.core.grid import mapped_coords

    return mapped_coords(fixed.voxel_matrix_to(model), fixed.shape, device)


def describe(space: ModelSpace) -> str:
    """One-line description, e.g. ``3D at 2x2x2 mm``."""
    size = "x".join(f"{v:g}" for v in space.voxel_size)
    return f"{space.ndim}D at {size} mm"


__all__ = ["ModelSpace", "model_grid", "field_to_fixed", "describe", "voxel_spacing"]
