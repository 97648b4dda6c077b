"""voxreg: deformable registration of 3D/2D medical images (VoxelMorph line).

The Python surface: :func:`register`, :func:`apply_field`, :func:`load_image`,
:func:`save_image`, :func:`measure_registration` and the :class:`Image` type. Conventions: docs/conventions.md.
"""

from voxreg.core.errors import CheckpointError, VoxregError
from voxreg.core.image import Image
from voxreg.io import load_image, save_image
from voxreg.registration.pipeline import RegistrationResult, apply_field, measure_registration, register, warp_image

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
