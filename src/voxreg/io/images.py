"""Reading and writing images and label maps; intensity normalisation.

World coordinates are RAS millimetres (nibabel convention); ``Image.affine`` maps voxel
indices to them. A 2D image is handled as a 3D grid with one slice (its affine is still 4x4).

Formats: NIfTI (``.nii``, ``.nii.gz``), MGH (``.mgz``, ``.mgh``), NRRD / MetaImage
(``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``; ``.nhdr``/``.mhd`` are read only), a DICOM
series folder (read only) and ``.npz`` (keys ``vol``/``seg`` plus optional ``affine``).
Every user-caused failure raises :class:`~voxreg.core.errors.VoxregError` with one line
``<file>: <problem>``; headers are checked before data is read (complex, RGB, sizes that
the file cannot hold). Every write is atomic (:func:`voxreg.io.files.atomic_write`).
Fields and transforms: :mod:`voxreg.io.transforms`; resampling: :mod:`voxreg.io.resample`.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

if TYPE_CHECKING:  # SimpleITK is imported where it is used: reading NIfTI or training never loads it
    import SimpleITK as sitk

from voxreg.core.errors import VoxregError, short_reason
from voxreg.core.grid import reduced_affine, voxel_spacing
from voxreg.core.image import Image
from voxreg.io.files import (
    DICOM_EXTS,
    ITK_EXTS,
    MGH_EXTS,
    NIFTI_EXTS,
    NPZ_EXTS,
    READABLE_EXTS,
    WRITABLE_EXTS,
    PathLike,
    atomic_write,
    extension,
    file_error,
    read_nibabel_gzip,
    stored_as_integer,
    write_nifti,
)

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

FIELD_INTENT_NAME = "voxreg_vox"
NIFTI_INTENT_VECTOR = 1007

_LABEL_TOLERANCE = 1e-3  # float label maps may carry rounding noise from scaling
_NPZ_IMAGE_KEYS = ("vol", "image", "arr_0")
_NPZ_LABEL_KEYS = ("seg",) + _NPZ_IMAGE_KEYS
#: largest image voxreg loads (2e9 voxels = 8 GB as float32): more is a corrupt header
MAX_IMAGE_VOXELS = 2_000_000_000
#: deflate cannot compress better than about 1032:1, so a gzip file claiming more data
#: than this many times its size has a corrupt header
_MAX_GZIP_RATIO = 1100
_GZIP_MAGIC = b"\x1f\x8b"


def _is_orthogonal(matrix: np.ndarray) -> bool:
    """True when the columns of ``matrix`` are mutually orthogonal (no shear)."""
    gram = matrix.T @ matrix
    diag = np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
    off = gram - np.diag(np.diag(gram))
    return bool(np.all(np.abs(off) <= 1e-6 * diag))


def set_nifti_xform(img: nib.Nifti1Image, affine: np.ndarray) -> None:
    """Store ``affine`` as sform (scanner) and, when it has no shear, as qform too."""
    img.set_sform(affine, code=1)
    if _is_orthogonal(affine[:3, :3]):
        img.set_qform(affine, code=1)
    else:
        img.set_qform(None, code=0)


# --------------------------------------------------------------------------- loading


#: a float image with integer values only and at most this many distinct values is a label map
MAX_FLOAT_LABELS = 1024


def looks_like_label_map(path: PathLike) -> bool:
    """True when the file holds a label map: an integer voxel type on disk, or floats that are
    all integers with at most :data:`MAX_FLOAT_LABELS` distinct values (label maps saved as
    float32, as FreeSurfer and Mindboggle do). A scan with a few integer levels can be forced
    to intensity with ``--linear``."""
    if stored_as_integer(path):
        return True
    try:
        image = load_image(path)
    except VoxregError:
        return False
    return has_label_values(image.array)


def has_label_values(array: np.ndarray) -> bool:
    """True when every value is an integer and there are at most :data:`MAX_FLOAT_LABELS`
    distinct values (a label map, whatever dtype it was stored in)."""
    values = np.unique(array)
    return values.size <= MAX_FLOAT_LABELS and bool(np.all(np.abs(values - np.round(values)) <= _LABEL_TOLERANCE))


def load_image(path: PathLike, label: bool = False) -> Image:
    """Load an image (or, with ``label=True``, a label map) as an :class:`Image`.

    Reads NIfTI, MGH/MGZ, NRRD, MetaImage, npz and DICOM series folders. Trailing
    singleton axes are dropped, so an ``(X, Y, 1)`` volume is a 2D image. Intensities
    are float32, labels int32 (after checking every value is an integer).
    Raises VoxregError naming the file for any problem.
    """
    path = Path(path)
    if not path.exists():
        raise file_error(path, "file not found")
    reader, kind = _reader_for(path)
    try:
        array, affine = reader(path, label)
    except VoxregError:
        raise
    except MemoryError as exc:
        raise file_error(path, "too large to load into memory (or its header is corrupt)") from exc
    except Exception as exc:  # library errors of any type: unreadable / wrong format
        raise file_error(path, f"cannot read as {kind} ({short_reason(exc)})") from exc
    _check_scalar_dtype(np.asarray(array).dtype, path)
    array = _spatial_array(array, path)
    array = _label_array(array, path) if label else _intensity_array(array, path)
    return Image(array, np.asarray(affine, dtype=np.float64), path)


def _reader_for(path: Path) -> tuple[Callable[[Path, bool], tuple[np.ndarray, np.ndarray]], str]:
    """The reader function and format name for ``path``."""
    if path.is_dir():
        return _read_dicom_series, "a DICOM series"
    ext = extension(path)
    if ext in NIFTI_EXTS + MGH_EXTS:
        return _read_nibabel, "NIfTI" if ext in NIFTI_EXTS else "MGH/MGZ"
    if ext in ITK_EXTS + DICOM_EXTS:
        return _read_itk_file, ext[1:].upper()
    if ext in NPZ_EXTS:
        return _read_npz, "npz"
    raise file_error(
        path,
        f"unsupported file type '{ext or path.name}'; expected one of "
        f"{', '.join(READABLE_EXTS)} or a DICOM series folder",
    )


def _is_gzip_name(path: Path) -> bool:
    """True for the gzip-compressed formats (``.nii.gz``, ``.mgz``)."""
    return path.name.lower().endswith((".gz", ".mgz"))


def _read_nibabel(path: Path, label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine of a NIfTI / MGH file (raw values for labels, floats otherwise).
    The header is checked (data type, size against the file) before any data is read."""
    if _is_gzip_name(path):
        with open(path, "rb") as handle:
            if handle.read(2) != _GZIP_MAGIC:
                kind = "NIfTI" if extension(path) in NIFTI_EXTS else "MGH/MGZ"
                raise file_error(
                    path, f"cannot read as {kind}: not a gzip-compressed file (corrupt, or wrong extension)"
                )
    img = _nibabel_image(path)
    dtype = img.get_data_dtype()
    _check_scalar_dtype(dtype, path)
    offset = img.header.get_data_offset() if hasattr(img.header, "get_data_offset") else 0
    _check_data_size(path, tuple(int(s) for s in img.shape), dtype.itemsize, max(int(offset), 0))
    if label:
        return np.asanyarray(img.dataobj), img.affine
    return img.get_fdata(dtype=np.float32), img.affine


def _nibabel_image(path: Path) -> nib.filebasedimages.FileBasedImage:
    """The nibabel image of ``path``: gzip files decompressed by ISA-L when available
    (:func:`voxreg.io.files.read_nibabel_gzip`), else ``nib.load``. Header problems of the
    in-memory path fall back to ``nib.load``, which reports them as it always did."""
    if _is_gzip_name(path):
        try:
            image = read_nibabel_gzip(path)
        except Exception:  # noqa: BLE001 - truncated/corrupt data: nib.load gives the known errors
            image = None
        if image is not None:
            return image
    return nib.load(path, mmap=False)


def _check_scalar_dtype(dtype: np.dtype, path: Path) -> None:
    """Refuse complex and colour (RGB, structured) voxel types: voxreg needs scalars."""
    if dtype.kind == "c":
        raise file_error(path, f"complex-valued image ({dtype}); pass a magnitude (real-valued) image")
    if dtype.fields is not None or dtype.kind == "V":
        names = ",".join(dtype.names or ()) or str(dtype)
        raise file_error(path, f"colour/multi-component image (voxels are {names}); pass a greyscale scalar image")
    if dtype.kind not in "biuf":
        raise file_error(path, f"unsupported voxel type {dtype}; pass a numeric scalar image")


def _check_data_size(path: Path, shape: tuple[int, ...], itemsize: int, offset: int) -> None:
    """Refuse a header whose image cannot be in the file (truncated file or corrupt header)
    or is too large to load, before reading (and allocating) anything."""
    voxels = math.prod(shape)
    text = "x".join(str(s) for s in shape)
    if voxels > MAX_IMAGE_VOXELS:
        raise file_error(
            path,
            f"header claims a {text} image ({voxels:.3g} voxels, more than {MAX_IMAGE_VOXELS:.0e}); "
            "the header is corrupt or the image is too large",
        )
    size = path.stat().st_size
    needed = voxels * itemsize
    if _is_gzip_name(path) or path.suffix.lower() in (".nrrd", ".mha"):
        if needed > _MAX_GZIP_RATIO * size:
            raise file_error(
                path, f"header claims a {text} image ({needed:.3g} bytes) but the file has {size} bytes; corrupt header"
            )
    elif needed + offset > size:
        raise file_error(
            path,
            f"header claims a {text} image ({needed} bytes of data) but the file has {size} bytes; "
            "the file is truncated or its header is corrupt",
        )


def _read_itk_file(path: Path, label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Array and RAS affine of a file SimpleITK reads (NRRD, MetaImage, DICOM slice);
    the header is checked before the voxels are read."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    _check_itk_info(path, reader.GetPixelID(), reader.GetNumberOfComponents(), reader.GetSize())
    if path.suffix.lower() in (".nrrd", ".mha"):  # header and voxels in one file
        _check_data_size(path, tuple(reader.GetSize()), 1, 0)
    return sitk_to_array(reader.Execute(), path)


def _check_itk_info(path: Path, pixel_id: int, components: int, size: tuple[int, ...]) -> None:
    """Refuse complex / multi-component voxels and impossible sizes from an ITK header."""
    import SimpleITK as sitk

    if pixel_id in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise file_error(path, "complex-valued image; pass a magnitude (real-valued) image")
    if components != 1:
        raise file_error(
            path,
            f"{components} components per voxel (complex, vector or RGB colour data); "
            "pass a scalar (greyscale or magnitude) image",
        )
    voxels = math.prod(int(s) for s in size)
    if voxels > MAX_IMAGE_VOXELS:
        raise file_error(
            path, f"header claims {voxels:.3g} voxels (more than {MAX_IMAGE_VOXELS:.0e}); corrupt header or too large"
        )


def _dicom_tag(reader: sitk.ImageFileReader, tag: str) -> str:
    """A DICOM tag of the file ``reader`` has read the header of ('' when absent)."""
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def describe_dicom_series(folder: Path, series: list[str]) -> list[str]:
    """One short description per series: UID, SeriesDescription and file count."""
    import SimpleITK as sitk

    out = []
    for uid in series:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        text = f"{uid} ({len(files)} files"
        try:
            info = sitk.ImageFileReader()
            info.SetFileName(files[0])
            info.LoadPrivateTagsOff()
            info.ReadImageInformation()
            description = _dicom_tag(info, "0008|103e")
            text += f", '{description}'" if description else ""
        except Exception:  # noqa: BLE001 - the description is only a hint
            pass
        out.append(text + ")")
    return out


def _read_dicom_series(path: Path, label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Array and RAS affine of the one DICOM series in folder ``path`` (a folder with
    several series is refused, naming them)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = list(reader.GetGDCMSeriesIDs(str(path)))
    if not series:
        raise file_error(path, "no DICOM series found in this folder")
    if len(series) > 1:
        raise file_error(
            path,
            f"folder holds {len(series)} DICOM series: {'; '.join(describe_dicom_series(path, series))}; "
            "pass a folder with one series",
        )
    files = reader.GetGDCMSeriesFileNames(str(path), series[0])
    reader.SetFileNames(files)
    image = reader.Execute()
    _check_itk_info(path, image.GetPixelID(), image.GetNumberOfComponentsPerPixel(), image.GetSize())
    return sitk_to_array(image, path)


def _read_npz(path: Path, label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine of an npz file (key 'vol'/'image'/'arr_0'/'seg' or its only array)."""
    if not zipfile.is_zipfile(path):
        raise file_error(path, "cannot read as npz (not a zip archive written by numpy.savez)")
    with np.load(path, allow_pickle=False) as data:
        keys = list(data.files)
        key = _npz_key(keys, label, path)
        array = np.asarray(data[key])
        affine = np.asarray(data["affine"], dtype=np.float64) if "affine" in keys else np.eye(4)
    if affine.shape != (4, 4):
        raise file_error(path, f"'affine' has shape {affine.shape}; expected 4x4")
    return array, affine


def _npz_key(keys: list[str], label: bool, path: Path) -> str:
    """The key of the image array inside an npz file."""
    for key in _NPZ_LABEL_KEYS if label else _NPZ_IMAGE_KEYS:
        if key in keys:
            return key
    arrays = [k for k in keys if k != "affine"]
    if len(arrays) == 1:
        return arrays[0]
    wanted = _NPZ_LABEL_KEYS if label else _NPZ_IMAGE_KEYS
    raise file_error(
        path,
        f"no image array found (keys: {', '.join(keys) or 'none'}); expected "
        f"one of {', '.join(wanted)} or a single array",
    )


def sitk_to_array(img: sitk.Image, path: PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Array in (x, y, z) index order and 4x4 RAS affine of a SimpleITK image."""
    import SimpleITK as sitk

    if img.GetNumberOfComponentsPerPixel() != 1:
        raise file_error(
            path or "image",
            f"vector image with {img.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar image",
        )
    array = sitk.GetArrayFromImage(img).T  # SimpleITK arrays are (z, y, x)
    dim = img.GetDimension()
    k = min(dim, 3)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)[:k, :k]
    lps = np.eye(4)
    lps[:k, :k] = direction * np.asarray(img.GetSpacing(), dtype=np.float64)[:k]
    lps[:k, 3] = np.asarray(img.GetOrigin(), dtype=np.float64)[:k]
    return np.ascontiguousarray(array), RAS_TO_LPS @ lps


def _spatial_array(array: np.ndarray, path: Path) -> np.ndarray:
    """Drop trailing singleton axes and check the result is a 2D or 3D image."""
    original = tuple(array.shape)
    while array.ndim > 1 and array.shape[-1] == 1:
        array = array[..., 0]
    if 0 < array.size and array.ndim < 2:
        text = "x".join(str(s) for s in original)
        raise file_error(
            path, f"image of shape {text} is 1D (fewer than 2 axes longer than 1); expected a 2D or 3D image"
        )
    if array.ndim == 4:
        raise file_error(path, f"4D volume with {array.shape[3]} frames; pass a single 3D volume")
    if array.ndim not in (2, 3):
        raise file_error(path, f"{array.ndim}D array of shape {tuple(array.shape)}; expected a 2D or 3D image")
    if array.size == 0:
        raise file_error(path, f"empty array of shape {tuple(array.shape)}")
    return array


def check_finite(array: np.ndarray, path: Path) -> None:
    """Raise when a floating array holds NaN or Inf voxels."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array.sum(dtype=np.float64)):
        bad = int(np.count_nonzero(~np.isfinite(array)))  # only for the message: no masks of a clean image
        if bad:
            raise file_error(path, f"{bad} voxels are NaN or Inf; fix or mask them first")


def _intensity_array(array: np.ndarray, path: Path) -> np.ndarray:
    """float32 copy of an intensity array, checked for NaN/Inf."""
    if np.iscomplexobj(array):
        raise file_error(path, "complex-valued image; pass a magnitude (real-valued) image")
    out = np.asarray(array, dtype=np.float32, order="C")  # one pass: cast and reorder together
    check_finite(out, path)
    return out


def _label_array(array: np.ndarray, path: Path) -> np.ndarray:
    """int32 copy of a label map after checking its values are integers (floats within
    1e-3 of an integer, e.g. from scl_slope rounding, are rounded)."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.int32)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating):
            raise file_error(path, f"label map of unsupported type {array.dtype}")
        with np.errstate(invalid="ignore"):  # NaN / out-of-range values fail the comparison below
            exact = array.astype(np.int32)  # in the file's memory order: contiguous passes
        if np.array_equal(exact, array):  # whole numbers stored as floats, the usual case (0.15 -> 0.09 s)
            return np.ascontiguousarray(exact)
        check_finite(array, path)
        rounded = np.round(array)
        deviation = np.abs(array - rounded)
        if float(deviation.max()) > _LABEL_TOLERANCE:
            worst = int(np.argmax(deviation))
            raise file_error(
                path,
                f"label map has non-integer values (e.g. {array.flat[worst]:g}); "
                "pass a segmentation with integer labels",
            )
        array = rounded
    info = np.iinfo(np.int32)
    if array.min() < info.min or array.max() > info.max:
        raise file_error(path, "label values do not fit in int32")
    return array.astype(np.int32, order="C")  # one pass: cast and reorder together


def as_label_image(image: Image) -> Image:
    """``image`` as a label map (int32 array), after checking its values are integers."""
    return Image(_label_array(image.array, image.path or "image"), image.affine.copy(), image.path)


def check_intensity_image(image: Image) -> None:
    """Raise VoxregError when an intensity image is empty (all zero) or constant."""
    name = str(image.path) if image.path is not None else "image"
    array = image.array
    if not np.any(array):
        raise VoxregError(f"{name}: image is empty (all voxels are zero)")
    low, high = np.min(array), np.max(array)
    if low == high:
        raise VoxregError(f"{name}: image is constant (every voxel is {float(low):g})")


def save_image(image: Image, path: PathLike) -> Path:
    """Write ``image`` atomically; the format follows the extension (NIfTI, MGZ/MGH,
    NRRD, MHA, npz). Label maps are stored with the smallest fitting integer dtype,
    intensities as float32."""
    path = Path(path)
    ext = extension(path)
    writer = _WRITERS.get(ext)
    if writer is None:
        raise file_error(path, f"cannot save as '{ext or path.name}'; use one of {', '.join(WRITABLE_EXTS)}")
    if image.is_label:
        array = image.array.astype(_label_dtype(image.array), copy=False)
    else:
        array = np.asarray(image.array, dtype=np.float32)
    affine = np.asarray(image.affine, dtype=np.float64)
    if ext in MGH_EXTS and not _is_orthogonal(affine[:3, :3]):
        raise file_error(path, "MGH/MGZ cannot store a sheared affine; save as .nii.gz")
    return atomic_write(path, lambda tmp: writer(tmp, array, affine))


def _label_dtype(array: np.ndarray) -> type:
    """Smallest of uint8 / int16 / int32 that holds every value of ``array``."""
    low, high = int(array.min()), int(array.max())
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    raise VoxregError(f"label values {low}..{high} do not fit in int32")


def _write_nifti(tmp: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """NIfTI-1 with sform (and qform when unsheared) code 'scanner'."""
    img = nib.Nifti1Image(array, affine)
    set_nifti_xform(img, affine)
    write_nifti(img, tmp)


def _write_mgh(tmp: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """MGH/MGZ; a 2D array becomes one slice."""
    nib.save(nib.MGHImage(array[..., None] if array.ndim == 2 else array, affine), tmp)


def _write_itk(tmp: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """NRRD / MetaImage via SimpleITK, compressed."""
    import SimpleITK as sitk

    sitk.WriteImage(array_to_sitk(array, affine), str(tmp), True)


def _write_npz(tmp: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Compressed npz with 'vol' (or 'seg' for labels) and 'affine'."""
    key = "seg" if np.issubdtype(array.dtype, np.integer) else "vol"
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **{key: array, "affine": affine})


_WRITERS: dict[str, Callable[[Path, np.ndarray, np.ndarray], None]] = {
    ".nii.gz": _write_nifti,
    ".nii": _write_nifti,
    ".mgz": _write_mgh,
    ".mgh": _write_mgh,
    ".nrrd": _write_itk,
    ".mha": _write_itk,
    ".npz": _write_npz,
}


def _is_axial_2d(affine: np.ndarray) -> bool:
    """True when a 2D image's affine is a plain x-y plane (an ITK 2D image keeps it all)."""
    return bool(np.allclose(affine[2], [0, 0, 1, 0]) and np.allclose(affine[:2, 2], 0))


def array_to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """SimpleITK image of an (x, y[, z]) array with a 4x4 RAS affine. A 2D array is a 2D
    ITK image when its plane is the x-y plane, else a 3D image with one slice."""
    import SimpleITK as sitk

    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    if array.ndim == 2 and not _is_axial_2d(affine):
        array = array[..., None]
    dim = array.ndim
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    matrix = lps[:dim, :dim]
    spacing = voxel_spacing(reduced_affine(lps, dim))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (matrix / spacing).ravel()])
    img.SetOrigin([float(v) for v in lps[:dim, 3]])
    return img


# --------------------------------------------------------------------------- intensities


def normalize_intensity(
    array: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5, window: tuple[float, float] | None = None
) -> np.ndarray:
    """Scale intensities to float32 in [0, 1].

    Without ``window``, ``low_pct``/``high_pct`` percentiles map to 0 and 1; when the
    image has a zero background (some voxels exactly 0) the percentiles are taken over
    the nonzero voxels only. ``window=(lo, hi)`` (e.g. CT Hounsfield units) clips to
    that range instead. A constant image gives all zeros.
    """
    values = np.asarray(array, dtype=np.float32)
    if window is not None:
        low, high = (float(v) for v in window)
        if not high > low:
            raise VoxregError(f"intensity window must be (low, high) with low < high, got {tuple(window)}")
    else:
        if not 0.0 <= low_pct < high_pct <= 100.0:
            raise VoxregError(f"percentiles must satisfy 0 <= low < high <= 100, got {low_pct}, {high_pct}")
        low, high = robust_range(values, low_pct, high_pct)
    if not high > low:
        return np.zeros_like(values)
    # one new array, scaled and clipped in place: the whole-array temporaries of
    # ``np.clip((values - low) / (high - low), 0, 1)`` cost a 1 mm scan 3 fresh 42 MB buffers
    scaled = np.subtract(values, np.float32(low), dtype=np.float32)
    scaled /= np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def robust_range(values: np.ndarray, low_pct: float, high_pct: float) -> tuple[float, float]:
    """Percentile range, over nonzero voxels for zero-background images; falls back to
    min/max when the percentiles coincide (e.g. a binary mask)."""
    nonzero = values != 0
    sample = values[nonzero] if nonzero.any() and not nonzero.all() else values.ravel()
    low, high = np.percentile(sample, [low_pct, high_pct])
    if not high > low:
        low, high = values.min(), values.max()
    return float(low), float(high)
