"""Reading and writing images, resampling between grids in world space, ITK export.

World coordinates are RAS millimetres (nibabel convention); ``Image.affine`` maps voxel
indices to them. ITK/ANTs use LPS: ``LPS = diag(-1, -1, 1) @ RAS``.
A 2D image is handled as a 3D grid with one slice (its affine is still 4x4).

Formats: NIfTI (``.nii``, ``.nii.gz``), MGH (``.mgz``, ``.mgh``), NRRD / MetaImage
(``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``; ``.nhdr``/``.mhd`` are read only), a DICOM
series folder (read only) and ``.npz`` (keys ``vol``/``seg`` plus optional ``affine``).
Every user-caused failure raises :class:`~voxreg.errors.VoxregError` with one line
``<file>: <problem>``. Every write goes to a temporary name in the target folder and is
renamed at the end (:func:`atomic_path`).

Displacement fields:

- voxreg format (:func:`save_field`): NIfTI of shape ``(*S, ndim)``, float32, the fixed
  affine, intent ``vector`` named ``voxreg_vox``; values in voxels of the fixed grid.
- ITK/ANTs format (:func:`save_itk_field`): NIfTI of shape ``(X, Y, Z, 1, 3)`` (2D:
  ``(X, Y, 1, 1, 2)``), intent ``vector``, float32, vectors in LPS millimetres on the
  fixed grid. ITK maps a fixed LPS point ``p`` to the moving point ``p + D(p)``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from voxreg import spatial
from voxreg.errors import VoxregError
from voxreg.image import Image

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
PathLike = str | os.PathLike

NIFTI_EXTS = (".nii.gz", ".nii")
MGH_EXTS = (".mgz", ".mgh")
ITK_EXTS = (".nrrd", ".nhdr", ".mha", ".mhd")
NPZ_EXTS = (".npz",)
DICOM_EXTS = (".dcm",)
READABLE_EXTS = NIFTI_EXTS + MGH_EXTS + ITK_EXTS + NPZ_EXTS + DICOM_EXTS
WRITABLE_EXTS = NIFTI_EXTS + MGH_EXTS + (".nrrd", ".mha") + NPZ_EXTS
FIELD_INTENT_NAME = "voxreg_vox"
NIFTI_INTENT_VECTOR = 1007

_LABEL_TOLERANCE = 1e-3  # float label maps may carry rounding noise from scaling
_NPZ_IMAGE_KEYS = ("vol", "image", "arr_0")
_NPZ_LABEL_KEYS = ("seg",) + _NPZ_IMAGE_KEYS
_ITK_AFFINE_NAME = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase)_(double|float)_([23])_\3$")


# --------------------------------------------------------------------------- helpers

def _ext(path: Path) -> str:
    """Lower-case extension, with ``.nii.gz`` as one extension."""
    name = path.name.lower()
    for ext in READABLE_EXTS:
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _one_line(text: str, limit: int = 300) -> str:
    """Collapse whitespace so a message fits on one line."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    """Short, one-line reason of a library exception (ITK messages are very verbose)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:
        if "ERROR" in line:
            return _one_line(line.split("): ", 1)[-1].replace("sitk::ERROR: ", ""))
    return _one_line(lines[0]) if lines else type(exc).__name__


def _fail(path: PathLike, problem: str) -> VoxregError:
    """A one-line VoxregError ``<path>: <problem>``."""
    return VoxregError(_one_line(f"{path}: {problem}", limit=500))


def _is_orthogonal(matrix: np.ndarray) -> bool:
    """True when the columns of ``matrix`` are mutually orthogonal (no shear)."""
    gram = matrix.T @ matrix
    diag = np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
    off = gram - np.diag(np.diag(gram))
    return bool(np.all(np.abs(off) <= 1e-6 * diag))


def _set_nifti_xform(img: nib.Nifti1Image, affine: np.ndarray) -> None:
    """Store ``affine`` as sform (scanner) and, when it has no shear, as qform too."""
    img.set_sform(affine, code=1)
    if _is_orthogonal(affine[:3, :3]):
        img.set_qform(affine, code=1)
    else:
        img.set_qform(None, code=0)


# --------------------------------------------------------------------------- loading

def load_image(path: PathLike, label: bool = False) -> Image:
    """Load an image (or, with ``label=True``, a label map) as an :class:`Image`.

    Reads NIfTI, MGH/MGZ, NRRD, MetaImage, npz and DICOM series folders. Trailing
    singleton axes are dropped, so an ``(X, Y, 1)`` volume is a 2D image. Intensities
    are float32, labels int32 (after checking every value is an integer).
    Raises VoxregError naming the file for any problem.
    """
    path = Path(path)
    if not path.exists():
        raise _fail(path, "file not found")
    reader, kind = _reader_for(path)
    try:
        array, affine = reader(path, label)
    except VoxregError:
        raise
    except Exception as exc:  # library errors of any type: unreadable / wrong format
        raise _fail(path, f"cannot read as {kind} ({_reason(exc)})") from exc
    array = _spatial_array(array, path)
    array = _label_array(array, path) if label else _intensity_array(array, path)
    return Image(array, np.asarray(affine, dtype=np.float64), path)


def _reader_for(path: Path) -> tuple[Callable[[Path, bool], tuple[np.ndarray, np.ndarray]], str]:
    """The reader function and format name for ``path``."""
    if path.is_dir():
        return _read_dicom_series, "a DICOM series"
    ext = _ext(path)
    if ext in NIFTI_EXTS + MGH_EXTS:
        return _read_nibabel, "NIfTI" if ext in NIFTI_EXTS else "MGH/MGZ"
    if ext in ITK_EXTS + DICOM_EXTS:
        return _read_itk_file, ext[1:].upper()
    if ext in NPZ_EXTS:
        return _read_npz, "npz"
    raise _fail(path, f"unsupported file type '{ext or path.name}'; expected one of "
                      f"{', '.join(READABLE_EXTS)} or a DICOM series folder")


def _read_nibabel(path: Path, label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine of a NIfTI / MGH file (raw values for labels, floats otherwise)."""
    img = nib.load(path, mmap=False)
    if label:
        return np.asanyarray(img.dataobj), img.affine
    return img.get_fdata(dtype=np.float32), img.affine


def _read_itk_file(path: Path, label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Array and RAS affine of a file SimpleITK reads (NRRD, MetaImage, DICOM slice)."""
    return sitk_to_array(sitk.ReadImage(str(path)), path)


def _read_dicom_series(path: Path, label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Array and RAS affine of the DICOM series in folder ``path`` (the largest series
    when the folder holds several)."""
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise _fail(path, "no DICOM series found in this folder")
    files = max((reader.GetGDCMSeriesFileNames(str(path), sid) for sid in series), key=len)
    reader.SetFileNames(files)
    return sitk_to_array(reader.Execute(), path)


def _read_npz(path: Path, label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine of an npz file (key 'vol'/'image'/'arr_0'/'seg' or its only array)."""
    if not zipfile.is_zipfile(path):
        raise _fail(path, "cannot read as npz (not a zip archive written by numpy.savez)")
    with np.load(path, allow_pickle=False) as data:
        keys = list(data.files)
        key = _npz_key(keys, label, path)
        array = np.asarray(data[key])
        affine = np.asarray(data["affine"], dtype=np.float64) if "affine" in keys else np.eye(4)
    if affine.shape != (4, 4):
        raise _fail(path, f"'affine' has shape {affine.shape}; expected 4x4")
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
    raise _fail(path, f"no image array found (keys: {', '.join(keys) or 'none'}); expected "
                      f"one of {', '.join(wanted)} or a single array")


def sitk_to_array(img: sitk.Image, path: PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Array in (x, y, z) index order and 4x4 RAS affine of a SimpleITK image."""
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise _fail(path or "image", f"vector image with {img.GetNumberOfComponentsPerPixel()} "
                                     "components per voxel; expected a scalar image")
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
    while array.ndim > 1 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 4:
        raise _fail(path, f"4D volume with {array.shape[3]} frames; pass a single 3D volume")
    if array.ndim not in (2, 3):
        raise _fail(path, f"{array.ndim}D array of shape {tuple(array.shape)}; "
                          "expected a 2D or 3D image")
    if array.size == 0:
        raise _fail(path, f"empty array of shape {tuple(array.shape)}")
    return array


def _check_finite(array: np.ndarray, path: Path) -> None:
    """Raise when a floating array holds NaN or Inf voxels."""
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise _fail(path, f"{bad} voxels are NaN or Inf; fix or mask them first")


def _intensity_array(array: np.ndarray, path: Path) -> np.ndarray:
    """float32 copy of an intensity array, checked for NaN/Inf."""
    if np.iscomplexobj(array):
        raise _fail(path, "complex-valued image; pass magnitude images")
    out = np.asarray(array, dtype=np.float32)
    _check_finite(out, path)
    return np.ascontiguousarray(out)


def _label_array(array: np.ndarray, path: Path) -> np.ndarray:
    """int32 copy of a label map after checking its values are integers (floats within
    1e-3 of an integer, e.g. from scl_slope rounding, are rounded)."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.int32)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating):
            raise _fail(path, f"label map of unsupported type {array.dtype}")
        _check_finite(array, path)
        rounded = np.round(array)
        deviation = np.abs(array - rounded)
        worst = int(np.argmax(deviation))
        if deviation.flat[worst] > _LABEL_TOLERANCE:
            raise _fail(path, f"label map has non-integer values (e.g. {array.flat[worst]:g}); "
                              "pass a segmentation with integer labels")
        array = rounded
    info = np.iinfo(np.int32)
    if array.min() < info.min or array.max() > info.max:
        raise _fail(path, "label values do not fit in int32")
    return np.ascontiguousarray(array.astype(np.int32))


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


# --------------------------------------------------------------------------- writing

def ensure_output_dir(path: PathLike) -> Path:
    """Create folder ``path`` (with parents) and check a file can be written there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".voxreg-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise VoxregError(f"output directory {path} is not writable ({reason})") from exc
    return path


def _temp_name(path: Path) -> Path:
    """A hidden, unique name next to ``path`` with the same extension(s)."""
    stem = path.name[: len(path.name) - len(_ext(path))]
    return path.with_name(f".{stem}.{secrets.token_hex(4)}.tmp{path.name[len(stem):]}")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same extensions) to write to; rename
    it to ``path`` on success, delete it when the block raises."""
    path = Path(path)
    ensure_output_dir(path.parent)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` inside :func:`atomic_path`; library errors become VoxregError."""
    try:
        with atomic_path(path) as tmp:
            write(tmp)
    except VoxregError:
        raise
    except Exception as exc:
        raise _fail(path, f"cannot write ({_reason(exc)})") from exc
    return path


def save_image(image: Image, path: PathLike) -> Path:
    """Write ``image`` atomically; the format follows the extension (NIfTI, MGZ/MGH,
    NRRD, MHA, npz). Label maps are stored with the smallest fitting integer dtype,
    intensities as float32."""
    path = Path(path)
    ext = _ext(path)
    writer = _WRITERS.get(ext)
    if writer is None:
        raise _fail(path, f"cannot save as '{ext or path.name}'; use one of {', '.join(WRITABLE_EXTS)}")
    if image.is_label:
        array = image.array.astype(_label_dtype(image.array), copy=False)
    else:
        array = np.asarray(image.array, dtype=np.float32)
    affine = np.asarray(image.affine, dtype=np.float64)
    if ext in MGH_EXTS and not _is_orthogonal(affine[:3, :3]):
        raise _fail(path, "MGH/MGZ cannot store a sheared affine; save as .nii.gz")
    return _atomic_write(path, lambda tmp: writer(tmp, array, affine))


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
    _set_nifti_xform(img, affine)
    nib.save(img, tmp)


def _write_mgh(tmp: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """MGH/MGZ; a 2D array becomes one slice."""
    nib.save(nib.MGHImage(array[..., None] if array.ndim == 2 else array, affine), tmp)


def _write_itk(tmp: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """NRRD / MetaImage via SimpleITK, compressed."""
    sitk.WriteImage(array_to_sitk(array, affine), str(tmp), True)


def _write_npz(tmp: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Compressed npz with 'vol' (or 'seg' for labels) and 'affine'."""
    key = "seg" if np.issubdtype(array.dtype, np.integer) else "vol"
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **{key: array, "affine": affine})


_WRITERS: dict[str, Callable[[Path, np.ndarray, np.ndarray], None]] = {
    ".nii.gz": _write_nifti, ".nii": _write_nifti, ".mgz": _write_mgh, ".mgh": _write_mgh,
    ".nrrd": _write_itk, ".mha": _write_itk, ".npz": _write_npz,
}


def _is_axial_2d(affine: np.ndarray) -> bool:
    """True when a 2D image's affine is a plain x-y plane (an ITK 2D image keeps it all)."""
    return bool(np.allclose(affine[2], [0, 0, 1, 0]) and np.allclose(affine[:2, 2], 0))


def array_to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """SimpleITK image of an (x, y[, z]) array with a 4x4 RAS affine. A 2D array is a 2D
    ITK image when its plane is the x-y plane, else a 3D image with one slice."""
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    if array.ndim == 2 and not _is_axial_2d(affine):
        array = array[..., None]
    dim = array.ndim
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    matrix = lps[:dim, :dim]
    spacing = np.sqrt((matrix ** 2).sum(axis=0))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (matrix / spacing).ravel()])
    img.SetOrigin([float(v) for v in lps[:dim, 3]])
    return img


# --------------------------------------------------------------------------- intensities

def normalize_intensity(array: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5,
                        window: tuple[float, float] | None = None) -> np.ndarray:
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
        low, high = _robust_range(values, low_pct, high_pct)
    if not high > low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _robust_range(values: np.ndarray, low_pct: float, high_pct: float) -> tuple[float, float]:
    """Percentile range, over nonzero voxels for zero-background images; falls back to
    min/max when the percentiles coincide (e.g. a binary mask)."""
    nonzero = values != 0
    sample = values[nonzero] if nonzero.any() and not nonzero.all() else values.ravel()
    low, high = np.percentile(sample, [low_pct, high_pct])
    if not high > low:
        low, high = values.min(), values.max()
    return float(low), float(high)


# --------------------------------------------------------------------------- resampling

def voxel_matrix(fixed_affine: np.ndarray, moving_affine: np.ndarray, ndim: int = 3,
                 world_matrix: np.ndarray | None = None) -> np.ndarray:
    """Matrix ``(ndim+1, ndim+1)`` mapping fixed voxel indices to moving voxel indices.

    ``world_matrix`` (4x4, RAS mm) maps fixed world points to moving world points
    (the affine stage); identity when None. For 2D both images are taken to lie in the
    same plane (the third axis is dropped).
    """
    world = np.eye(4) if world_matrix is None else np.asarray(world_matrix, dtype=np.float64)
    full = np.linalg.inv(np.asarray(moving_affine, dtype=np.float64)) @ world @ np.asarray(
        fixed_affine, dtype=np.float64)
    keep = list(range(ndim)) + [3]
    return full[np.ix_(keep, keep)]


def resample_to(moving: Image, fixed: Image, world_matrix: np.ndarray | None = None,
                nearest: bool | None = None, device: str | torch.device = "cpu",
                field: np.ndarray | torch.Tensor | None = None) -> Image:
    """Resample ``moving`` onto ``fixed``'s grid in world coordinates.

    Handles different shapes, voxel sizes and orientations. Label maps (integer
    arrays) use nearest neighbour and 0 outside; intensities use linear interpolation and
    ``min(moving minimum, 0)`` outside its field of view (0 for MRI, air for CT in HU).
    ``world_matrix`` maps fixed world points to moving world points (identity when None);
    ``field`` is a displacement in fixed voxels applied first, so a fixed voxel ``x`` samples
    the moving scan at ``world_matrix(fixed_affine (x + field(x)))`` with ONE interpolation.
    The result carries the fixed affine.
    """
    if moving.ndim != fixed.ndim:
        raise VoxregError(f"cannot resample the {moving.ndim}D image {moving.name} onto the "
                          f"{fixed.ndim}D grid of {fixed.name}")
    ndim = fixed.ndim
    matrix = voxel_matrix(fixed.affine, moving.affine, ndim, world_matrix)
    if field is None and np.allclose(matrix, np.eye(ndim + 1), atol=1e-6) and moving.shape == fixed.shape:
        return Image(moving.array.copy(), fixed.affine.copy(), moving.path)
    use_nearest = moving.is_label if nearest is None else nearest
    array = moving.array
    if np.issubdtype(array.dtype, np.floating) or not use_nearest:
        array = array.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(array))[None, None].to(device)
    coords = _mapped_coords(matrix, fixed.shape, device) if field is None else \
        _displaced_coords(matrix, field, fixed.shape, device)
    if use_nearest:
        out = spatial.sample(tensor, coords, "nearest", padding="zeros")
    else:  # pad with min(image min, 0): sample (image - low) with zero padding, add low back
        low = min(float(tensor.min()), 0.0) if tensor.numel() else 0.0
        out = spatial.sample(tensor - low, coords, "linear", padding="zeros") + low
    return Image(out[0, 0].cpu().numpy(), fixed.affine.copy(), moving.path)


def _mapped_coords(matrix: np.ndarray, shape: Sequence[int], device: str | torch.device) -> torch.Tensor:
    """Moving voxel coordinates ``(1, ndim, *shape)`` of every fixed voxel (computed in float64)."""
    ndim = len(shape)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    mapped = np.tensordot(matrix[:ndim, :ndim], grid, axes=1) + matrix[:ndim, ndim].reshape(
        ndim, *([1] * ndim))
    return torch.as_tensor(mapped[None], dtype=torch.float32, device=device)


def _displaced_coords(matrix: np.ndarray, field: np.ndarray | torch.Tensor, shape: Sequence[int],
                      device: str | torch.device) -> torch.Tensor:
    """Moving voxel coordinates of ``x + field(x)`` for every fixed voxel ``x``."""
    ndim = len(shape)
    field = torch.as_tensor(field, dtype=torch.float32, device=device)
    points = spatial.identity_grid(shape, device) + (field if field.dim() == ndim + 2 else field[None])
    m = torch.as_tensor(matrix, dtype=torch.float32, device=device)
    mapped = m[:ndim, :ndim] @ points.reshape(ndim, -1) + m[:ndim, ndim:]
    return mapped.reshape(1, ndim, *shape)


# --------------------------------------------------------------------------- fields

def _field_array(field: np.ndarray | torch.Tensor, fixed: Image) -> np.ndarray:
    """float32 ``(ndim, *S)`` numpy copy of a field, checked against the fixed grid."""
    if isinstance(field, torch.Tensor):
        field = field.detach().cpu().numpy()
    field = np.asarray(field)
    if field.ndim == fixed.ndim + 2 and field.shape[0] == 1:
        field = field[0]
    expected = (fixed.ndim, *fixed.shape)
    if field.shape != expected:
        raise VoxregError(f"displacement field of shape {field.shape} does not match the grid of "
                          f"{fixed.name} (expected {expected})")
    return field.astype(np.float32, copy=False)


def _require_nifti(path: Path, what: str) -> None:
    """Raise unless ``path`` has a NIfTI extension."""
    if _ext(path) not in NIFTI_EXTS:
        raise _fail(path, f"{what} must be saved as .nii.gz or .nii")


def save_field(path: PathLike, field: np.ndarray | torch.Tensor, fixed: Image) -> Path:
    """Write a displacement ``field`` ``(ndim, *S)`` (voxels of ``fixed``'s grid) in voxreg
    format: NIfTI ``(*S, ndim)`` float32, fixed affine, intent vector 'voxreg_vox'."""
    path = Path(path)
    _require_nifti(path, "a displacement field")
    data = np.ascontiguousarray(np.moveaxis(_field_array(field, fixed), 0, -1))
    img = nib.Nifti1Image(data, fixed.affine)
    _set_nifti_xform(img, fixed.affine)
    img.header.set_intent("vector", (), name=FIELD_INTENT_NAME)
    return _atomic_write(path, lambda tmp: nib.save(img, tmp))


def load_field(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a voxreg-format field: ``(field (ndim, *S) float32 voxels, 4x4 affine)``."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "file not found")
    try:
        img = nib.load(path)
    except Exception as exc:
        raise _fail(path, f"cannot read as NIfTI ({_reason(exc)})") from exc
    intent = img.header.get_intent() if isinstance(img, nib.Nifti1Image) else ("none", (), "")
    if intent[0] != "vector" or intent[2] != FIELD_INTENT_NAME:
        raise _fail(path, "not a voxreg displacement field (expected a NIfTI with intent "
                          f"'vector' named '{FIELD_INTENT_NAME}'; ITK fields cannot be loaded here)")
    try:
        data = img.get_fdata(dtype=np.float32)
    except Exception as exc:
        raise _fail(path, f"cannot read the field data ({_reason(exc)})") from exc
    ndim = data.ndim - 1
    if ndim not in (2, 3) or data.shape[-1] != ndim:
        raise _fail(path, f"displacement field has shape {data.shape}; expected (*S, ndim)")
    _check_finite(data, path)
    return np.ascontiguousarray(np.moveaxis(data, -1, 0)), np.asarray(img.affine, dtype=np.float64)


def itk_field_supported(fixed: Image) -> bool:
    """False for a 2D image whose plane is tilted out of world x-y (ITK's 2D displacement
    field images cannot express that plane); True otherwise."""
    if fixed.ndim != 2:
        return True
    in_plane = fixed.affine[:3, :2]
    return bool(np.allclose(in_plane[2], 0.0, atol=1e-6 * np.abs(in_plane).max()))


def field_to_itk_image(field: np.ndarray | torch.Tensor, fixed: Image) -> nib.Nifti1Image:
    """ITK/ANTs displacement field NIfTI of a voxreg ``field`` on ``fixed``'s grid.

    3D: shape ``(X, Y, Z, 1, 3)``; vectors ``D_LPS = RAS_TO_LPS[:3,:3] @ A[:3,:3] @ u``.
    2D: shape ``(X, Y, 1, 1, 2)``, which ITK reads as a 2D field in the first two LPS
    coordinates; only possible when the image plane is parallel to the x-y plane
    (raises VoxregError otherwise). float32, intent vector (1007).
    """
    data = _field_array(field, fixed)
    affine = fixed.affine
    if fixed.ndim == 3:
        linear = RAS_TO_LPS[:3, :3] @ affine[:3, :3]
        vectors = np.einsum("ij,j...->...i", linear, data)[..., None, :]
    else:
        if not itk_field_supported(fixed):
            raise VoxregError(f"{fixed.name}: ITK export of a 2D field needs an image plane parallel "
                              "to the x-y plane; this 2D image is tilted out of it")
        linear = (RAS_TO_LPS[:3, :3] @ affine[:3, :2])[:2]
        vectors = np.einsum("ij,j...->...i", linear, data)[:, :, None, None, :]
    img = nib.Nifti1Image(np.ascontiguousarray(vectors, dtype=np.float32), affine)
    _set_nifti_xform(img, affine)
    img.header.set_intent("vector", ())
    return img


def save_itk_field(path: PathLike, field: np.ndarray | torch.Tensor, fixed: Image) -> Path:
    """Atomically write :func:`field_to_itk_image` of ``field`` (for antsApplyTransforms /
    SimpleITK ``DisplacementFieldTransform``)."""
    path = Path(path)
    _require_nifti(path, "an ITK displacement field")
    img = field_to_itk_image(field, fixed)
    return _atomic_write(path, lambda tmp: nib.save(img, tmp))


# --------------------------------------------------------------------------- ITK affine

def write_itk_affine(path: PathLike, world_matrix_ras: np.ndarray) -> Path:
    """Write a 4x4 RAS world matrix (fixed -> moving points) as an ITK affine transform
    (text ``#Insight Transform File V1.0``; binary ITK MATLAB format for ``.mat``),
    which maps fixed LPS points to moving LPS points."""
    path = Path(path)
    matrix = np.asarray(world_matrix_ras, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise VoxregError(f"{path}: world matrix must be a 4x4 affine with last row 0 0 0 1")
    lps = RAS_TO_LPS @ matrix @ RAS_TO_LPS
    if path.suffix.lower() == ".mat":
        transform = sitk.AffineTransform(3)
        transform.SetMatrix([float(v) for v in lps[:3, :3].ravel()])
        transform.SetTranslation([float(v) for v in lps[:3, 3]])
        return _atomic_write(path, lambda tmp: sitk.WriteTransform(transform, str(tmp)))
    params = " ".join(f"{v:.17g}" for v in [*lps[:3, :3].ravel(), *lps[:3, 3]])
    text = ("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
            f"Parameters: {params}\nFixedParameters: 0 0 0\n")
    return _atomic_write(path, lambda tmp: tmp.write_text(text))


def read_itk_affine(path: PathLike) -> np.ndarray:
    """Read an ITK affine (text, or ANTs ``.mat``) as a 4x4 RAS matrix mapping fixed
    world points to moving world points. Accepts AffineTransform /
    MatrixOffsetTransformBase, double or float, 3D or 2D, with any center."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "file not found")
    if path.suffix.lower() == ".mat":
        name, params, fixed = _read_itk_binary(path)
    else:
        name, params, fixed = _parse_itk_text(path)
    return _itk_to_ras(name, params, fixed, path)


def _read_itk_binary(path: Path) -> tuple[str, list[float], list[float]]:
    """Transform name, parameters and fixed parameters of an ITK MATLAB ``.mat`` file."""
    try:
        transform = sitk.ReadTransform(str(path))
    except Exception as exc:
        raise _fail(path, f"cannot read as an ITK transform ({_reason(exc)})") from exc
    dim = transform.GetDimension()
    return (f"{transform.GetName()}_double_{dim}_{dim}", list(transform.GetParameters()),
            list(transform.GetFixedParameters()))


def _parse_itk_text(path: Path) -> tuple[str, list[float], list[float]]:
    """Transform name, parameters and fixed parameters of an ITK text transform file."""
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, f"not an ITK transform text file ({_reason(exc)})") from exc
    if not lines or not lines[0].startswith("#Insight Transform File"):
        raise _fail(path, "not an ITK transform file (missing '#Insight Transform File' header)")
    fields: dict[str, list[str]] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            fields.setdefault(key.strip(), []).append(value.strip())
    names = fields.get("Transform", [])
    if len(names) != 1:
        raise _fail(path, f"holds {len(names)} transforms; expected exactly one affine transform")
    try:
        params = [float(v) for v in fields.get("Parameters", [""])[0].split()]
        fixed = [float(v) for v in fields.get("FixedParameters", [""])[0].split()]
    except ValueError as exc:
        raise _fail(path, f"malformed transform parameters ({exc})") from exc
    return names[0], params, fixed


def _itk_to_ras(name: str, params: list[float], fixed: list[float], path: Path) -> np.ndarray:
    """4x4 RAS world matrix of an ITK matrix-offset transform ``A (x - c) + t + c`` (LPS)."""
    match = _ITK_AFFINE_NAME.match(name)
    if match is None:
        raise _fail(path, f"unsupported transform type '{name}'; expected AffineTransform_double_3_3")
    dim = int(match.group(3))
    if len(params) != dim * dim + dim or len(fixed) not in (0, dim):
        raise _fail(path, f"{name} needs {dim * dim + dim} parameters and {dim} fixed parameters, "
                          f"got {len(params)} and {len(fixed)}")
    linear = np.reshape(params[: dim * dim], (dim, dim))
    center = np.asarray(fixed if fixed else [0.0] * dim)
    lps = np.eye(4)
    lps[:dim, :dim] = linear
    lps[:dim, 3] = np.asarray(params[dim * dim:]) + center - linear @ center
    return RAS_TO_LPS @ lps @ RAS_TO_LPS
