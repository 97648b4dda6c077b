"""The `Image` type passed between every stage of voxreg.

Conventions (see docs/conventions.md):

- ``array`` holds the spatial axes only (2D or 3D), float32 for intensities and an
  integer dtype for label maps.
- ``affine`` is the 4x4 voxel-index -> world (RAS, millimetres) matrix, as nibabel
  uses, also for 2D images (the third axis is then a single slice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Image:
    """A scan or label map with its voxel-to-world (RAS mm) affine."""

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    path: Path | None = None

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

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
        return np.sqrt((self.affine[:3, : self.ndim] ** 2).sum(axis=0))

    @property
    def is_label(self) -> bool:
        """True when the array has an integer dtype (a label map)."""
        return np.issubdtype(self.array.dtype, np.integer)

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

    def with_array(self, array: np.ndarray) -> "Image":
        """A new Image on the same grid holding ``array``."""
        return Image(array, self.affine.copy(), self.path)
