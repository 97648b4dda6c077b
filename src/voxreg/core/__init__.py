"""The core: ``Image`` (array + affine + kind), ``Grid`` (voxel <-> world maths), spatial ops
on tensors (warp, integrate, compose, resize, Jacobian), errors and runtime settings.
No file io here. Names are imported on first use (PEP 562): ``voxreg.core.errors`` stays torch-free."""

from typing import TYPE_CHECKING

from voxreg._lazy import lazy_exports

if TYPE_CHECKING:
    from voxreg.core.errors import CheckpointError, VoxregError
    from voxreg.core.grid import Grid
    from voxreg.core.image import Image

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "CheckpointError": "voxreg.core.errors",
        "VoxregError": "voxreg.core.errors",
        "Grid": "voxreg.core.grid",
        "Image": "voxreg.core.image",
    },
)

__all__ = ["CheckpointError", "VoxregError", "Grid", "Image"]
