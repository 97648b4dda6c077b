"""The core: ``Image`` (array + affine + kind), ``Grid`` (voxel <-> world maths), spatial ops
on tensors (warp, integrate, compose, resize, Jacobian), errors and runtime settings.
No file io here."""

from voxreg.core.errors import CheckpointError, VoxregError
from voxreg.core.grid import Grid
from voxreg.core.image import Image

__all__ = ["CheckpointError", "VoxregError", "Grid", "Image"]
