"""The `Image` type passed between every stage of voxreg.

Conventions (see docs/conventions.md):

- ``array`` holds the spatial axes only (2D or 3D), float32 for intensities and an
  integer dtype for label maps.
- ``affine`` is the 4x4 voxel-index -> world (RAS, millimetres) matrix, as nibabel
  uses, also for 2D images (the third axis is then a single slice).
- ``kind`` is ``'intensity'`` or ``'label'`` (default: ``'label'`` for an integer array);
  label maps are only ever resampled with nearest neighbour.

Geometry (spacing, world points, voxel matrices) lives in :mod:`voxreg.core.grid`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from voxreg.core.grid import Grid, voxel_spacing

Kind = Literal["intensity", "label"]


@dataclass
class Image:
    """A scan or label map with its voxel-to-world (RAS mm) affine."""

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    path: Path | None = None
    kind: Kind | None = None  # None: derived from the dtype (integer -> 'label')

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.kind is None:
            self.kind = "label" if np.issubdtype(np.asarray(self.array).dtype, np.integer) else "intensity"
        if self.kind not in get_args(Kind):
            raise ValueError(f"kind must be one of {', '.join(get_args(Kind))}; got {self.kind!r}")

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return self.array.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of the array."""
        return tuple(self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis."""
        return voxel_spacing(self.affine, self.ndim)

    @property
    def grid(self) -> Grid:
        """The sampling grid (shape and affine) of this image."""
        return Grid(self.shape, self.affine)

    @property
    def is_label(self) -> bool:
        """True for a label map (``kind == 'label'``)."""
        return self.kind == "label"

    @property
    def name(self) -> str:
        """File name without extensions, or 'image' when not loaded from a file."""
        if self.path is None:
            return "image"
        name = Path(self.path).name
        for ext in (".nii.gz", ".nii", ".mgz", ".nrrd", ".mha", ".mhd", ".npz"):
            if name.endswith(ext):
                return name[: -len(ext)]
        return name

    def with_array(self, array: np.ndarray) -> Image:
        """A new Image on the same grid holding ``array`` (kind derived from its dtype)."""
        return Image(array, self.affine.copy(), self.path)
