"""voxreg: deformable registration of 3D/2D medical images (VoxelMorph line).

The Python surface: :func:`register`, :func:`apply_field`, :func:`load_image`,
:func:`save_image`, :func:`measure_registration` and the :class:`Image` type. Conventions: docs/conventions.md.

The names are imported on first use (PEP 562), so ``import voxreg`` and ``voxreg --help``
do not import torch.
"""

from typing import TYPE_CHECKING

from voxreg._lazy import lazy_exports

if TYPE_CHECKING:
    from voxreg.core.errors import CheckpointError, VoxregError
    from voxreg.core.image import Image
    from voxreg.io.images import load_image, save_image
    from voxreg.registration.pipeline import (
        RegistrationResult,
        apply_field,
        measure_registration,
        register,
        warp_image,
    )

_PIPELINE = "voxreg.registration.pipeline"
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "register": _PIPELINE,
        "measure_registration": _PIPELINE,
        "apply_field": _PIPELINE,
        "warp_image": _PIPELINE,
        "RegistrationResult": _PIPELINE,
        "Image": "voxreg.core.image",
        "load_image": "voxreg.io.images",
        "save_image": "voxreg.io.images",
        "VoxregError": "voxreg.core.errors",
        "CheckpointError": "voxreg.core.errors",
    },
)

__all__ = [
    "register",
    "measure_registration",
    "apply_field",
    "warp_image",
    "RegistrationResult",
    "Image",
    "load_image",
    "save_image",
    "VoxregError",
    "CheckpointError",
]
__version__ = "0.1.0"
