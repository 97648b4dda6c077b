"""Displacement fields (voxreg and ITK/ANTs formats) and ITK affine transform files.

- voxreg format (:func:`save_field`): NIfTI of shape ``(*S, ndim)``, float32, the fixed
  affine, intent ``vector`` named ``voxreg_vox``; values in voxels of the fixed grid.
- ITK/ANTs format (:func:`save_itk_field`): NIfTI of shape ``(X, Y, Z, 1, 3)`` (2D:
  ``(X, Y, 1, 1, 2)``), intent ``vector``, float32, vectors in LPS millimetres on the
  fixed grid. ITK maps a fixed LPS point ``p`` to the moving point ``p + D(p)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import torch

if TYPE_CHECKING:  # imported where ITK transform files are read or written
    import SimpleITK as sitk

from voxreg.core.errors import VoxregError, short_reason
from voxreg.core.image import Image
from voxreg.io.files import NIFTI_EXTS, PathLike, atomic_write, extension, file_error, write_nifti_chunks
from voxreg.io.images import FIELD_INTENT_NAME, RAS_TO_LPS, _nibabel_image, check_finite, set_nifti_xform

_ITK_AFFINE_NAME = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase)_(double|float)_([23])_\3$")

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
        raise VoxregError(
            f"displacement field of shape {field.shape} does not match the grid of {fixed.name} (expected {expected})"
        )
    return field.astype(np.float32, copy=False)


def vectors_last_fortran(field: np.ndarray, linear: np.ndarray | None = None) -> np.ndarray:
    """``(*S, k)`` Fortran-ordered array (NIfTI's byte order, written without another copy) of
    a ``(ndim, *S)`` field, its vectors mapped by the ``(k, ndim)`` matrix ``linear`` when
    given: one multi-threaded torch pass (numpy's moveaxis copy / einsum took 0.18 / 0.50 s
    for a 1 mm brain's field, torch 0.14 / 0.21 s on 2 cores)."""
    spatial = field.ndim - 1
    if not (field.flags.c_contiguous and field.flags.writeable):  # torch.from_numpy needs both
        field = np.array(field, order="C")
    reversed_axes = torch.from_numpy(field).permute(0, *range(spatial, 0, -1))  # (ndim, *reversed S)
    if linear is not None:
        reversed_axes = torch.einsum("ij,j...->i...", torch.from_numpy(linear), reversed_axes)
    return reversed_axes.contiguous().numpy().T


def _require_nifti(path: Path, what: str) -> None:
    """Raise unless ``path`` has a NIfTI extension."""
    if extension(path) not in NIFTI_EXTS:
        raise file_error(path, f"{what} must be saved as .nii.gz or .nii")


def nifti_vectors(field: np.ndarray | torch.Tensor, fixed: Image) -> np.ndarray:
    """A displacement ``field`` ``(ndim, *S)`` (voxels of ``fixed``'s grid, checked against it)
    in NIfTI's byte order: ``(*S, ndim)`` float32, Fortran-ordered (one full-size reordering
    copy, for an image in memory; the writers reorder chunk by chunk, :func:`field_chunks`)."""
    return vectors_last_fortran(_field_array(field, fixed))


def save_field(path: PathLike, field: np.ndarray | torch.Tensor, fixed: Image) -> Path:
    """Write a displacement ``field`` ``(ndim, *S)`` (voxels of ``fixed``'s grid) in voxreg
    format: NIfTI ``(*S, ndim)`` float32, fixed affine, intent vector 'voxreg_vox'. The
    vectors are reordered into NIfTI's byte order a few MB at a time while they are written
    (:func:`field_chunks`): no full-size copy of the field."""
    path = Path(path)
    _require_nifti(path, "a displacement field")
    values = torch.from_numpy(_field_array(field, fixed))
    img = nib.Nifti1Image(np.broadcast_to(np.float32(0), (*fixed.shape, fixed.ndim)), fixed.affine)
    set_nifti_xform(img, fixed.affine)
    img.header.set_intent("vector", (), name=FIELD_INTENT_NAME)
    return atomic_write(path, lambda tmp: write_nifti_chunks(img, tmp, field_chunks(values)))


#: voxels of one chunk of a field written to disk (one component, a slab of the last axis)
WRITE_CHUNK_VOXELS = 1 << 20


def field_chunks(field: torch.Tensor, linear: torch.Tensor | None = None) -> Iterator[np.ndarray]:
    """The vectors of ``field`` ``(ndim, *S)``, mapped by the ``(k, ndim)`` matrix ``linear``
    when given, in NIfTI's byte order (``(*S, k)`` Fortran-ordered: component after component,
    each with the first axis fastest) as C-contiguous chunks of about :data:`WRITE_CHUNK_VOXELS`
    voxels: a slab of the last axis, reordered (and mapped: one row of ``linear`` at a time,
    the same float32 values as the whole product) when it is written."""
    ndim, shape = field.shape[0], tuple(field.shape[1:])
    reverse = tuple(range(len(shape) - 1, -1, -1))  # the spatial axes reversed
    step = max(1, WRITE_CHUNK_VOXELS // max(math.prod(shape[:-1]), 1))
    for row in range(ndim if linear is None else linear.shape[0]):
        for start in range(0, shape[-1], step):
            part = field[..., start : start + step]  # (ndim, *slab), a view
            if linear is None:
                values = part[row]
            else:  # the row's vectors, mapped in the field's own voxel order
                values = torch.mm(linear[row : row + 1], part.reshape(ndim, -1)).view(part.shape[1:])
            yield _axes_reversed(values, reverse)


def _axes_reversed(values: torch.Tensor, reverse: tuple[int, ...]) -> np.ndarray:
    """``values`` with its axes reversed, C-contiguous. A 3D slab is copied one plane of its
    middle axis at a time (2D transposes): 2.5x faster than one 3D permute, whose reads or
    writes stride across the whole slab (a 1 mm brain's field component: 0.09 -> 0.035 s)."""
    if values.dim() != 3:
        return values.permute(reverse).contiguous().numpy()
    out = torch.empty(values.shape[::-1], dtype=values.dtype)
    for j in range(values.shape[1]):
        out[:, j, :].copy_(values[:, j, :].t())
    return out.numpy()


def load_field(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a voxreg-format field: ``(field (ndim, *S) float32 voxels, 4x4 affine)``. A gzip
    file is decompressed by ISA-L in one call and the vectors moved first by one
    multi-threaded torch pass (a 1 mm brain's field: 0.6 -> 0.3 s)."""
    path = Path(path)
    _field_header(path)  # exists, a voxreg field (cheap: nibabel reads the header only)
    try:
        img = _nibabel_image(path)
        data = img.get_fdata(dtype=np.float32)
    except Exception as exc:
        raise file_error(path, f"cannot read the field data ({short_reason(exc)})") from exc
    ndim = data.ndim - 1
    if ndim not in (2, 3) or data.shape[-1] != ndim:
        raise file_error(path, f"displacement field has shape {data.shape}; expected (*S, ndim)")
    check_finite(data, path)
    reversed_axes = torch.from_numpy(np.require(data.T, requirements=["C", "W"]))  # (ndim, *reversed S), no copy
    vectors_first = reversed_axes.permute(0, *range(ndim, 0, -1)).contiguous().numpy()
    return vectors_first, np.asarray(img.affine, dtype=np.float64)


def field_grid(path: PathLike) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape ``(ndim, *S)`` and 4x4 affine of the voxreg-format field at ``path``, from its
    header alone (e.g. to check that two fields share a grid without reading either)."""
    header, affine = _field_header(Path(path))
    shape = tuple(int(n) for n in header.get_data_shape())
    ndim = len(shape) - 1
    if ndim not in (2, 3) or shape[-1] != ndim:
        raise file_error(path, f"displacement field has shape {shape}; expected (*S, ndim)")
    return (ndim, *shape[:-1]), affine


def _field_header(path: Path) -> tuple[Any, np.ndarray]:
    """(NIfTI header, 4x4 affine) of a voxreg-format field file, read without its data;
    one-line errors for a missing file, a non-NIfTI file or another kind of field."""
    if not path.exists():
        raise file_error(path, "file not found")
    try:
        img = nib.load(path)
    except Exception as exc:
        raise file_error(path, f"cannot read as NIfTI ({short_reason(exc)})") from exc
    intent = img.header.get_intent() if isinstance(img, nib.Nifti1Image) else ("none", (), "")
    if intent[0] != "vector" or intent[2] != FIELD_INTENT_NAME:
        raise file_error(
            path,
            "not a voxreg displacement field (expected a NIfTI with intent "
            f"'vector' named '{FIELD_INTENT_NAME}'; ITK fields cannot be loaded here)",
        )
    return img.header, np.asarray(img.affine, dtype=np.float64)


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
    return _itk_image(nifti_vectors(field, fixed), fixed)


def _itk_image(vectors: np.ndarray, fixed: Image) -> nib.Nifti1Image:
    """:func:`field_to_itk_image` of a field in NIfTI's order (:func:`nifti_vectors`): its
    vectors mapped to LPS millimetres by one matrix product, without reordering the voxels."""
    _check_vectors(vectors, fixed)
    affine = fixed.affine
    linear = _itk_linear(fixed)
    vectors_first = torch.from_numpy(vectors.T)  # (ndim, *reversed S), C-ordered: a view
    mapped = torch.mm(torch.from_numpy(linear), vectors_first.reshape(fixed.ndim, -1))
    lps = mapped.reshape(vectors_first.shape).numpy().T  # (*S, ndim) Fortran-ordered again
    lps = lps[..., None, :] if fixed.ndim == 3 else lps[:, :, None, None, :]
    img = nib.Nifti1Image(np.asfortranarray(lps, dtype=np.float32), affine)  # written without a copy
    set_nifti_xform(img, affine)
    img.header.set_intent("vector", ())
    return img


def _itk_linear(fixed: Image) -> np.ndarray:
    """``(ndim, ndim)`` float32 map of voxreg vectors (fixed voxels) to ITK's (LPS mm);
    a 2D image tilted out of the x-y plane raises VoxregError (:func:`itk_field_supported`)."""
    affine = fixed.affine
    if fixed.ndim == 3:
        return (RAS_TO_LPS[:3, :3] @ affine[:3, :3]).astype(np.float32)  # no float64 copy of the field
    if not itk_field_supported(fixed):
        raise VoxregError(
            f"{fixed.name}: ITK export of a 2D field needs an image plane parallel "
            "to the x-y plane; this 2D image is tilted out of it"
        )
    return (RAS_TO_LPS[:3, :3] @ affine[:3, :2])[:2].astype(np.float32)


def _check_vectors(vectors: np.ndarray, fixed: Image) -> None:
    """Raise unless ``vectors`` is a float32 Fortran-ordered ``(*S, ndim)`` array of ``fixed``'s grid."""
    expected = (*fixed.shape, fixed.ndim)
    if vectors.shape != expected or vectors.dtype != np.float32 or not vectors.flags.f_contiguous:
        raise VoxregError(
            f"field vectors of shape {vectors.shape} ({vectors.dtype}) are not the NIfTI order of "
            f"{fixed.name}'s grid (expected Fortran-ordered float32 {expected}; see nifti_vectors)"
        )


def save_itk_field(path: PathLike, field: np.ndarray | torch.Tensor, fixed: Image) -> Path:
    """Atomically write :func:`field_to_itk_image` of ``field`` (for antsApplyTransforms /
    SimpleITK ``DisplacementFieldTransform``), its vectors mapped and reordered a few MB at a
    time while they are written (:func:`field_chunks`): no full-size copy of the field."""
    path = Path(path)
    _require_nifti(path, "an ITK displacement field")
    values = torch.from_numpy(_field_array(field, fixed))
    linear = torch.from_numpy(_itk_linear(fixed))
    shape = (*fixed.shape, 1, 3) if fixed.ndim == 3 else (*fixed.shape, 1, 1, 2)
    img = nib.Nifti1Image(np.broadcast_to(np.float32(0), shape), fixed.affine)
    set_nifti_xform(img, fixed.affine)
    img.header.set_intent("vector", ())
    return atomic_write(path, lambda tmp: write_nifti_chunks(img, tmp, field_chunks(values, linear)))


# --------------------------------------------------------------------------- ITK affine


def _itk_affine_transform(lps: np.ndarray) -> sitk.AffineTransform:
    """SimpleITK 3D affine transform of a 4x4 LPS matrix (center 0)."""
    import SimpleITK as sitk

    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in lps[:3, :3].ravel()])
    transform.SetTranslation([float(v) for v in lps[:3, 3]])
    return transform


def write_itk_affine(path: PathLike, world_matrix_ras: np.ndarray) -> Path:
    """Write a 4x4 RAS world matrix (fixed -> moving points) as an ITK affine transform
    through SimpleITK (text ``#Insight Transform File V1.0`` for ``.txt``/``.tfm``, binary
    ITK MATLAB format for ``.mat``), which maps fixed LPS points to moving LPS points."""
    import SimpleITK as sitk

    path = Path(path)
    matrix = np.asarray(world_matrix_ras, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise VoxregError(f"{path}: world matrix must be a 4x4 affine with last row 0 0 0 1")
    transform = _itk_affine_transform(RAS_TO_LPS @ matrix @ RAS_TO_LPS)
    return atomic_write(path, lambda tmp: sitk.WriteTransform(transform, str(tmp)))


def read_itk_affine(path: PathLike) -> np.ndarray:
    """Read an ITK affine (text, or ANTs ``.mat``) through SimpleITK as a 4x4 RAS matrix
    mapping fixed world points to moving world points. Accepts AffineTransform /
    MatrixOffsetTransformBase, double or float, 3D or 2D, with any center."""
    path = Path(path)
    if not path.exists():
        raise file_error(path, "file not found")
    name = None if path.suffix.lower() == ".mat" else _itk_text_name(path)
    transform = _read_itk_transform(path)
    if name is None:
        dim = transform.GetDimension()
        name = f"{transform.GetName()}_double_{dim}_{dim}"
    return _itk_to_ras(name, list(transform.GetParameters()), list(transform.GetFixedParameters()), path)


def _read_itk_transform(path: Path) -> sitk.Transform:
    """The (single) transform of an ITK transform file, read by SimpleITK."""
    import SimpleITK as sitk

    try:
        return sitk.ReadTransform(str(path))
    except Exception as exc:
        raise file_error(path, f"not an ITK transform file ({short_reason(exc)})") from exc


def _itk_text_name(path: Path) -> str:
    """Transform type named in an ITK text file (checked to hold exactly one transform),
    which SimpleITK does not report for MatrixOffsetTransformBase."""
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise file_error(path, f"not an ITK transform text file ({short_reason(exc)})") from exc
    if not lines or not lines[0].startswith("#Insight Transform File"):
        raise file_error(path, "not an ITK transform file (missing '#Insight Transform File' header)")
    names = [ln.partition(":")[2].strip() for ln in lines if ln.startswith("Transform:")]
    if len(names) != 1:
        raise file_error(path, f"holds {len(names)} transforms; expected exactly one affine transform")
    return names[0]


def _itk_to_ras(name: str, params: list[float], fixed: list[float], path: Path) -> np.ndarray:
    """4x4 RAS world matrix of an ITK matrix-offset transform ``A (x - c) + t + c`` (LPS)."""
    match = _ITK_AFFINE_NAME.match(name)
    if match is None:
        raise file_error(path, f"unsupported transform type '{name}'; expected AffineTransform_double_3_3")
    dim = int(match.group(3))
    if len(params) != dim * dim + dim or len(fixed) not in (0, dim):
        raise file_error(
            path,
            f"{name} needs {dim * dim + dim} parameters and {dim} fixed parameters, got {len(params)} and {len(fixed)}",
        )
    linear = np.reshape(params[: dim * dim], (dim, dim))
    center = np.asarray(fixed if fixed else [0.0] * dim)
    lps = np.eye(4)
    lps[:dim, :dim] = linear
    lps[:dim, 3] = np.asarray(params[dim * dim :]) + center - linear @ center
    return RAS_TO_LPS @ lps @ RAS_TO_LPS
