"""Files in and out: images (NIfTI, MGZ, NRRD/MHA, DICOM, npz), transforms (voxreg and
ITK/ANTs fields, ITK affine text), tables (label LUTs), templates (MNI152 from the nilearn
wheel), resampling between grids in world space, and atomic writes.

World coordinates are RAS millimetres (nibabel convention); ``Image.affine`` maps voxel
indices to them. ITK/ANTs use LPS: ``LPS = diag(-1, -1, 1) @ RAS``. Every user-caused
failure raises :class:`~voxreg.core.errors.VoxregError` with one line ``<file>: <problem>``.
"""

from voxreg.io.files import (
    DICOM_EXTS,
    ITK_EXTS,
    MGH_EXTS,
    NIFTI_EXTS,
    NPZ_EXTS,
    READABLE_EXTS,
    WRITABLE_EXTS,
    atomic_path,
    atomic_write,
    ensure_output_dir,
    extension,
    file_error,
    stored_as_integer,
    strip_extension,
)
from voxreg.io.images import (
    FIELD_INTENT_NAME,
    NIFTI_INTENT_VECTOR,
    RAS_TO_LPS,
    array_to_sitk,
    as_label_image,
    check_intensity_image,
    has_label_values,
    load_image,
    looks_like_label_map,
    normalize_intensity,
    robust_range,
    save_image,
    sitk_to_array,
)
from voxreg.io.resample import resample_to
from voxreg.io.transforms import (
    field_to_itk_image,
    itk_field_supported,
    load_field,
    read_itk_affine,
    save_field,
    save_itk_field,
    write_itk_affine,
)

__all__ = [
    "DICOM_EXTS",
    "ITK_EXTS",
    "MGH_EXTS",
    "NIFTI_EXTS",
    "NPZ_EXTS",
    "READABLE_EXTS",
    "WRITABLE_EXTS",
    "atomic_path",
    "atomic_write",
    "ensure_output_dir",
    "extension",
    "file_error",
    "stored_as_integer",
    "strip_extension",
    "FIELD_INTENT_NAME",
    "NIFTI_INTENT_VECTOR",
    "RAS_TO_LPS",
    "array_to_sitk",
    "as_label_image",
    "check_intensity_image",
    "has_label_values",
    "load_image",
    "looks_like_label_map",
    "normalize_intensity",
    "robust_range",
    "save_image",
    "sitk_to_array",
    "resample_to",
    "field_to_itk_image",
    "itk_field_supported",
    "load_field",
    "read_itk_affine",
    "save_field",
    "save_itk_field",
    "write_itk_affine",
]
