"""Files in and out: images (NIfTI, MGZ, NRRD/MHA, DICOM, npz), transforms (voxreg and
ITK/ANTs fields, ITK affine text), tables (label LUTs), templates (MNI152 from the nilearn
wheel), resampling between grids in world space, and atomic writes.

World coordinates are RAS millimetres (nibabel convention); ``Image.affine`` maps voxel
indices to them. ITK/ANTs use LPS: ``LPS = diag(-1, -1, 1) @ RAS``. Every user-caused
failure raises :class:`~voxreg.core.errors.VoxregError` with one line ``<file>: <problem>``.

Names are imported on first use (PEP 562), so importing the package stays cheap.
"""

from typing import TYPE_CHECKING

from voxreg._lazy import lazy_exports

if TYPE_CHECKING:
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
        field_grid,
        field_to_itk_image,
        itk_field_supported,
        load_field,
        nifti_vectors,
        read_itk_affine,
        save_field,
        save_itk_field,
        write_itk_affine,
    )

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "DICOM_EXTS": "voxreg.io.files",
        "ITK_EXTS": "voxreg.io.files",
        "MGH_EXTS": "voxreg.io.files",
        "NIFTI_EXTS": "voxreg.io.files",
        "NPZ_EXTS": "voxreg.io.files",
        "READABLE_EXTS": "voxreg.io.files",
        "WRITABLE_EXTS": "voxreg.io.files",
        "atomic_path": "voxreg.io.files",
        "atomic_write": "voxreg.io.files",
        "ensure_output_dir": "voxreg.io.files",
        "extension": "voxreg.io.files",
        "file_error": "voxreg.io.files",
        "stored_as_integer": "voxreg.io.files",
        "strip_extension": "voxreg.io.files",
        "FIELD_INTENT_NAME": "voxreg.io.images",
        "NIFTI_INTENT_VECTOR": "voxreg.io.images",
        "RAS_TO_LPS": "voxreg.io.images",
        "array_to_sitk": "voxreg.io.images",
        "as_label_image": "voxreg.io.images",
        "check_intensity_image": "voxreg.io.images",
        "has_label_values": "voxreg.io.images",
        "load_image": "voxreg.io.images",
        "looks_like_label_map": "voxreg.io.images",
        "normalize_intensity": "voxreg.io.images",
        "robust_range": "voxreg.io.images",
        "save_image": "voxreg.io.images",
        "sitk_to_array": "voxreg.io.images",
        "resample_to": "voxreg.io.resample",
        "field_to_itk_image": "voxreg.io.transforms",
        "itk_field_supported": "voxreg.io.transforms",
        "field_grid": "voxreg.io.transforms",
        "load_field": "voxreg.io.transforms",
        "read_itk_affine": "voxreg.io.transforms",
        "save_field": "voxreg.io.transforms",
        "nifti_vectors": "voxreg.io.transforms",
        "save_itk_field": "voxreg.io.transforms",
        "write_itk_affine": "voxreg.io.transforms",
    },
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
    "field_grid",
    "load_field",
    "read_itk_affine",
    "save_field",
    "nifti_vectors",
    "save_itk_field",
    "write_itk_affine",
]
