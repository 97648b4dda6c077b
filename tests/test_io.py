"""Tests of voxreg.io: formats, world-space resampling, ITK/ANTs export, errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from voxreg import io
from voxreg.core import grid, spatial
from voxreg.core.errors import VoxregError
from voxreg.core.image import Image

F = io.RAS_TO_LPS
SHAPE = (12, 14, 10)


# --------------------------------------------------------------------------- helpers


def rotation(angles: tuple[float, float, float]) -> np.ndarray:
    """3x3 rotation about x, then y, then z (radians)."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_affine(angles=(0.2, -0.15, 0.3), spacing=(1.2, 0.9, 1.5), origin=(-7.0, 12.5, 3.25)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation(angles) * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


def world_points(affine: np.ndarray, shape) -> np.ndarray:
    """World (RAS) coordinates of every voxel, shape (3, *shape)."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    ndim = len(shape)
    return np.tensordot(affine[:3, :ndim], grid, axes=1) + affine[:3, 3].reshape(3, *([1] * ndim))


def smooth(points: np.ndarray) -> np.ndarray:
    """A smooth test function of world position (wavelengths >> voxel size)."""
    x, y, z = points
    return (1.0 + np.sin(x / 6.0) * np.cos(y / 7.0) + 0.5 * np.cos(z / 5.0 + 0.3)).astype(np.float32)


def centred(affine: np.ndarray, shape, point) -> np.ndarray:
    """``affine`` translated so that the centre of a grid of ``shape`` lies at world ``point``."""
    out = affine.copy()
    out[:3, 3] = np.asarray(point) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return out


def random_image(rng: np.random.Generator, shape=SHAPE, affine=None) -> Image:
    return Image(rng.random(shape, dtype=np.float32), make_affine() if affine is None else affine)


def inside_mask(coords: np.ndarray, shape, margin: float = 1.0) -> np.ndarray:
    """Voxels whose mapped coordinates (ndim, *S) lie at least ``margin`` inside ``shape``."""
    return np.all([(c >= margin) & (c <= s - 1 - margin) for c, s in zip(coords, shape)], axis=0)


def mapped_coords(fixed: Image, moving: Image, world: np.ndarray | None = None) -> np.ndarray:
    matrix = grid.voxel_matrix(fixed.affine, moving.affine, fixed.ndim, world)
    indices = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in fixed.shape], indexing="ij"))
    nd = fixed.ndim
    return np.tensordot(matrix[:nd, :nd], indices, axes=1) + matrix[:nd, nd].reshape(nd, *([1] * nd))


def nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI with nibabel directly (independent of voxreg's writer)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return path


def to_sitk_array(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img).T


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mgz", ".nrrd", ".mha", ".npz"])
def test_roundtrip_keeps_array_and_affine(tmp_path: Path, ext: str) -> None:
    rng = np.random.default_rng(0)
    image = random_image(rng)
    path = io.save_image(image, tmp_path / f"img{ext}")
    loaded = io.load_image(path)
    assert loaded.array.dtype == np.float32 and loaded.shape == SHAPE
    np.testing.assert_array_equal(loaded.array, image.array)
    np.testing.assert_allclose(loaded.affine, image.affine, atol=1e-4 if ext == ".mgz" else 1e-9)
    assert loaded.path == path
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"img{ext}"]


@pytest.mark.parametrize("ext", [".nii.gz", ".mgz", ".nrrd", ".mha", ".npz"])
def test_label_roundtrip_integer_dtype(tmp_path: Path, ext: str) -> None:
    rng = np.random.default_rng(1)
    labels = Image(rng.integers(0, 300, SHAPE).astype(np.int64), make_affine())
    loaded = io.load_image(io.save_image(labels, tmp_path / f"seg{ext}"), label=True)
    assert loaded.array.dtype == np.int32
    np.testing.assert_array_equal(loaded.array, labels.array)
    if ext == ".nii.gz":
        assert nib.load(tmp_path / f"seg{ext}").get_data_dtype() == np.int16


def axial_2d_affine() -> np.ndarray:
    affine = np.eye(4)
    angle = 0.3
    affine[:2, :2] = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * [1.2, 0.9]
    affine[:2, 3] = [4.0, -3.0]
    return affine


@pytest.mark.parametrize("ext", [".nii.gz", ".mgz", ".nrrd", ".mha", ".npz"])
@pytest.mark.parametrize("tilted", [False, True])
def test_2d_roundtrip(tmp_path: Path, ext: str, tilted: bool) -> None:
    affine = make_affine() if tilted else axial_2d_affine()
    image = Image(np.random.default_rng(2).random((12, 14), dtype=np.float32), affine)
    loaded = io.load_image(io.save_image(image, tmp_path / f"img{ext}"))
    assert loaded.ndim == 2 and loaded.shape == (12, 14)
    np.testing.assert_array_equal(loaded.array, image.array)
    np.testing.assert_allclose(loaded.affine, affine, atol=1e-4 if ext == ".mgz" else 1e-9)


def test_2d_nifti_with_singleton_axis_stays_2d(tmp_path: Path) -> None:
    data = np.arange(12 * 14, dtype=np.float32).reshape(12, 14, 1)
    path = nifti(tmp_path / "slice.nii.gz", data, axial_2d_affine())
    image = io.load_image(path)
    assert image.ndim == 2 and image.shape == (12, 14)
    np.testing.assert_array_equal(image.array, data[..., 0])
    np.testing.assert_allclose(image.spacing, [1.2, 0.9])


def test_itk_formats_written_by_itk_match_nifti_affine(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = rng.random(SHAPE, dtype=np.float32)
    affine = make_affine()
    path = nifti(tmp_path / "ref.nii.gz", data, affine)
    itk_image = sitk.ReadImage(str(path))  # ITK's own RAS -> LPS conversion
    for ext in (".nrrd", ".mha"):
        sitk.WriteImage(itk_image, str(tmp_path / f"copy{ext}"))
    nib.save(nib.MGHImage(data, affine), tmp_path / "copy.mgz")
    for ext in (".nrrd", ".mha", ".mgz"):
        loaded = io.load_image(tmp_path / f"copy{ext}")
        np.testing.assert_allclose(loaded.affine, affine, atol=1e-4)
        np.testing.assert_array_equal(loaded.array, data)


def test_dicom_series_folder(tmp_path: Path) -> None:
    data = (np.arange(12 * 14 * 5).reshape(12, 14, 5) % 251).astype(np.int16)
    volume = sitk.GetImageFromArray(data.T)
    volume.SetSpacing((0.8, 0.9, 2.0))
    volume.SetOrigin((10.0, -20.0, 30.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    for k in range(data.shape[2]):
        slice_ = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"{uid}.{k + 1}",
            "0020|000d": f"{uid}.100",
            "0020|000e": f"{uid}.200",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:g}" for v in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": "2.0",
            "0028|0030": "0.9\\0.8",
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)
    image = io.load_image(tmp_path)
    assert image.shape == (12, 14, 5)
    np.testing.assert_allclose(image.spacing, [0.8, 0.9, 2.0], atol=1e-6)
    np.testing.assert_allclose(image.affine[:3, 3], [-10.0, 20.0, 30.0], atol=1e-6)  # LPS -> RAS
    np.testing.assert_array_equal(image.array, data.astype(np.float32))


def test_npz_keys_and_affine(tmp_path: Path) -> None:
    vol = np.random.default_rng(4).random(SHAPE, dtype=np.float32)
    seg = (vol > 0.5).astype(np.uint8)
    affine = make_affine()
    np.savez(tmp_path / "pair.npz", vol=vol, seg=seg, affine=affine)
    np.savez(tmp_path / "single.npz", whatever=vol)
    np.testing.assert_array_equal(io.load_image(tmp_path / "pair.npz").array, vol)
    np.testing.assert_array_equal(io.load_image(tmp_path / "pair.npz", label=True).array, seg)
    np.testing.assert_allclose(io.load_image(tmp_path / "pair.npz").affine, affine)
    single = io.load_image(tmp_path / "single.npz")
    np.testing.assert_array_equal(single.affine, np.eye(4))
    np.testing.assert_array_equal(single.array, vol)


# --------------------------------------------------------------------------- resampling


def reoriented_pair(tmp_path: Path, data: np.ndarray) -> tuple[Image, Image]:
    affine = make_affine()
    original = nib.Nifti1Image(data, affine)
    ornt = np.array([[1, -1], [2, 1], [0, -1]])  # permute axes and flip two of them
    copy = original.as_reoriented(ornt)
    assert copy.shape != original.shape
    nib.save(original, tmp_path / "orig.nii.gz")
    nib.save(copy, tmp_path / "reor.nii.gz")
    label = np.issubdtype(data.dtype, np.integer)
    return (io.load_image(tmp_path / "orig.nii.gz", label=label), io.load_image(tmp_path / "reor.nii.gz", label=label))


def test_reoriented_copy_resamples_to_original(tmp_path: Path) -> None:
    data = np.random.default_rng(5).random(SHAPE, dtype=np.float32)
    original, copy = reoriented_pair(tmp_path, data)
    back = io.resample_to(copy, original)
    np.testing.assert_allclose(back.array, original.array, atol=1e-5)
    np.testing.assert_array_equal(back.affine, original.affine)


def test_reoriented_labels_resample_exactly(tmp_path: Path) -> None:
    data = np.random.default_rng(6).integers(0, 5, SHAPE).astype(np.int16)
    original, copy = reoriented_pair(tmp_path, data)
    back = io.resample_to(copy, original)
    assert back.array.dtype == np.int32
    np.testing.assert_array_equal(back.array, original.array)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0)])
def test_oblique_or_coarser_copy_resamples_to_original(spacing) -> None:
    fixed_affine = make_affine(angles=(0, 0, 0), spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0))
    fixed = Image(smooth(world_points(fixed_affine, (16, 16, 12))), fixed_affine)
    # a copy sampled on a rotated, shifted grid that covers the fixed field of view
    moving_shape = tuple(int(np.ceil(28 / s)) for s in spacing)
    centre = np.array([7.5, 7.5, 5.5]) + [0.3, -0.2, 0.1]  # fixed centre, shifted off-grid
    moving_affine = centred(make_affine(angles=(0.25, -0.2, 0.35), spacing=spacing), moving_shape, centre)
    moving = Image(smooth(world_points(moving_affine, moving_shape)), moving_affine)
    back = io.resample_to(moving, fixed)
    mask = inside_mask(mapped_coords(fixed, moving), moving_shape)
    assert mask.mean() > 0.9
    tolerance = 0.01 if spacing[0] == 1.0 else 0.04
    assert np.abs(back.array - fixed.array)[mask].max() < tolerance


# --------------------------------------------------------------------------- fields


@pytest.mark.parametrize("shape", [SHAPE, (12, 14)])
def test_voxreg_field_roundtrip(tmp_path: Path, shape) -> None:
    rng = np.random.default_rng(7)
    affine = make_affine() if len(shape) == 3 else axial_2d_affine()
    fixed = Image(np.zeros(shape, np.float32), affine)
    field = rng.normal(size=(len(shape), *shape)).astype(np.float32)
    io.save_field(tmp_path / "field.nii.gz", torch.from_numpy(field)[None], fixed)
    header = nib.load(tmp_path / "field.nii.gz").header
    assert header.get_intent() == ("vector", (), "voxreg_vox")
    assert nib.load(tmp_path / "field.nii.gz").shape == (*shape, len(shape))
    loaded, loaded_affine = io.load_field(tmp_path / "field.nii.gz")
    np.testing.assert_array_equal(loaded, field)
    np.testing.assert_allclose(loaded_affine, affine)


def synthetic_field(shape) -> np.ndarray:
    """Smooth displacement (voxels) of at most ~1.5 voxels."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    phase = sum(g / s for g, s in zip(grid, shape))
    return np.stack([(1.5 - 0.4 * d) * np.sin(2 * np.pi * phase + d) for d in range(len(shape))]).astype(np.float32)


def test_itk_field_matches_voxreg_warp_3d(tmp_path: Path) -> None:
    affine = make_affine()
    moving = Image(smooth(world_points(affine, SHAPE) * 1.5), affine)
    field = synthetic_field(SHAPE)
    warped = spatial.warp(torch.from_numpy(moving.array)[None, None], torch.from_numpy(field)[None])[0, 0].numpy()

    io.save_itk_field(tmp_path / "field_itk.nii.gz", field, moving)
    header = nib.load(tmp_path / "field_itk.nii.gz").header
    assert header["intent_code"] == 1007 and header.get_data_dtype() == np.float32
    assert nib.load(tmp_path / "field_itk.nii.gz").shape == (*SHAPE, 1, 3)

    ref = sitk.ReadImage(str(nifti(tmp_path / "moving.nii.gz", moving.array, affine)))
    displacement = sitk.ReadImage(str(tmp_path / "field_itk.nii.gz"))
    transform = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    itk_warped = to_sitk_array(sitk.Resample(ref, ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))

    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    mask = inside_mask(grid + field, SHAPE, margin=0.5)
    assert mask.mean() > 0.5
    assert np.abs(itk_warped - warped)[mask].max() < 1e-4
    assert np.abs(warped - moving.array)[mask].max() > 0.1  # the field does something


def test_itk_field_matches_voxreg_warp_2d(tmp_path: Path) -> None:
    shape = (12, 14)
    affine = axial_2d_affine()
    moving = Image(smooth(world_points(affine, shape) * 1.5), affine)
    field = synthetic_field(shape)
    warped = spatial.warp(torch.from_numpy(moving.array)[None, None], torch.from_numpy(field)[None])[0, 0].numpy()
    io.save_itk_field(tmp_path / "field_itk.nii.gz", field, moving)
    assert nib.load(tmp_path / "field_itk.nii.gz").shape == (*shape, 1, 1, 2)

    ref = sitk.ReadImage(str(nifti(tmp_path / "moving.nii.gz", moving.array, affine)))
    displacement = sitk.ReadImage(str(tmp_path / "field_itk.nii.gz"))
    assert displacement.GetDimension() == 2 and displacement.GetNumberOfComponentsPerPixel() == 2
    transform = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    itk_warped = to_sitk_array(sitk.Resample(ref, ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    mask = inside_mask(grid + field, shape, margin=0.5)
    assert np.abs(itk_warped - warped)[mask].max() < 1e-4


def test_itk_field_2d_out_of_plane_is_refused() -> None:
    fixed = Image(np.zeros((12, 14), np.float32), make_affine(), Path("tilted.nii.gz"))
    with pytest.raises(VoxregError) as excinfo:
        io.field_to_itk_image(np.zeros((2, 12, 14), np.float32), fixed)
    assert_one_line_error(excinfo, "tilted", "2D")


# --------------------------------------------------------------------------- ITK affine


def world_matrix() -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = rotation((0.1, 0.05, -0.12)) @ np.diag([1.05, 0.95, 1.02])
    matrix[:3, :3] += np.array([[0, 0.03, 0], [0, 0, 0], [0.02, 0, 0]])  # a little shear
    matrix[:3, 3] = [2.5, -1.75, 1.25]
    return matrix


def test_itk_affine_file_maps_lps_points(tmp_path: Path) -> None:
    matrix = world_matrix()
    path = io.write_itk_affine(tmp_path / "affine.txt", matrix)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[:3] == ["#Insight Transform File V1.0", "#Transform 0", "Transform: AffineTransform_double_3_3"]
    assert lines[4] == "FixedParameters: 0 0 0"
    transform = sitk.ReadTransform(str(path))
    points = np.random.default_rng(8).uniform(-50, 50, (5, 3))
    for p in points:
        expected = (F @ matrix @ F @ np.append(p, 1.0))[:3]
        np.testing.assert_allclose(transform.TransformPoint(p.tolist()), expected, atol=1e-9)
    np.testing.assert_allclose(io.read_itk_affine(path), matrix, atol=1e-12)


def test_itk_affine_resampling_matches_resample_to(tmp_path: Path) -> None:
    matrix = world_matrix()
    fixed_affine = make_affine(angles=(0.1, 0.2, -0.1), spacing=(1.1, 1.0, 1.3), origin=(-6, -7, -6))
    moving_shape = (18, 18, 16)
    fixed_centre = fixed_affine @ np.append((np.array(SHAPE) - 1) / 2, 1.0)
    moving_affine = centred(
        make_affine(angles=(-0.2, 0.1, 0.25), spacing=(0.9, 1.2, 1.0)),
        moving_shape,
        (matrix @ fixed_centre)[:3] + [0.3, -0.4, 0.2],
    )
    fixed = Image(np.zeros(SHAPE, np.float32), fixed_affine)
    moving = Image(smooth(world_points(moving_affine, moving_shape) * 2.0), moving_affine)
    ours = io.resample_to(moving, fixed, world_matrix=matrix).array

    transform = sitk.ReadTransform(str(io.write_itk_affine(tmp_path / "affine.txt", matrix)))
    ref_fixed = sitk.ReadImage(str(nifti(tmp_path / "fixed.nii.gz", fixed.array, fixed_affine)))
    ref_moving = sitk.ReadImage(str(nifti(tmp_path / "moving.nii.gz", moving.array, moving_affine)))
    theirs = to_sitk_array(sitk.Resample(ref_moving, ref_fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    mask = inside_mask(mapped_coords(fixed, moving, matrix), moving_shape, margin=0.5)
    assert mask.mean() > 0.8
    assert np.abs(ours - theirs)[mask].max() < 1e-4


def test_read_itk_affine_center_and_type_names(tmp_path: Path) -> None:
    matrix = world_matrix()
    lps = F @ matrix @ F
    center = np.array([10.0, -20.0, 5.0])
    translation = lps[:3, 3] - center + lps[:3, :3] @ center  # same map, expressed about center
    params = " ".join(f"{v:.17g}" for v in [*lps[:3, :3].ravel(), *translation])
    for name in ("AffineTransform_float_3_3", "MatrixOffsetTransformBase_double_3_3"):
        path = tmp_path / f"{name}.tfm"
        path.write_text(
            f"#Insight Transform File V1.0\n#Transform 0\nTransform: {name}\n"
            f"Parameters: {params}\nFixedParameters: {center[0]} {center[1]} {center[2]}\n"
        )
        np.testing.assert_allclose(io.read_itk_affine(path), matrix, atol=1e-9)
    written = sitk.AffineTransform(3)
    written.SetMatrix(lps[:3, :3].ravel().tolist())
    written.SetCenter(center.tolist())
    written.SetTranslation(translation.tolist())
    sitk.WriteTransform(written, str(tmp_path / "ants.mat"))
    np.testing.assert_allclose(io.read_itk_affine(tmp_path / "ants.mat"), matrix, atol=1e-9)
    io.write_itk_affine(tmp_path / "ours.mat", matrix)
    np.testing.assert_allclose(io.read_itk_affine(tmp_path / "ours.mat"), matrix, atol=1e-9)


# --------------------------------------------------------------------------- intensities


def test_normalize_zero_background_uses_nonzero_percentiles() -> None:
    array = np.zeros((10, 10), np.float32)
    array[2:8, 2:8] = np.linspace(101, 136, 36).reshape(6, 6)
    out = io.normalize_intensity(array, low_pct=0, high_pct=100)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[2:8, 2:8], (array[2:8, 2:8] - 101) / 35, atol=1e-6)
    assert out[0, 0] == 0.0
    robust = io.normalize_intensity(array)
    low, high = np.percentile(array[2:8, 2:8], [0.5, 99.5])
    np.testing.assert_allclose(robust[4, 4], np.clip((array[4, 4] - low) / (high - low), 0, 1), atol=1e-6)
    assert robust.min() == 0.0 and robust.max() == 1.0


def test_normalize_window_constant_and_mask() -> None:
    ct = np.array([-1000.0, -100.0, 100.0, 300.0, 2000.0], np.float32)
    np.testing.assert_allclose(io.normalize_intensity(ct, window=(-100, 300)), [0, 0, 0.5, 1, 1])
    np.testing.assert_array_equal(io.normalize_intensity(np.full((3, 3), 7.0)), np.zeros((3, 3)))
    mask = np.zeros((4, 4))
    mask[1:3, 1:3] = 1
    np.testing.assert_array_equal(io.normalize_intensity(mask), mask)
    with pytest.raises(VoxregError):
        io.normalize_intensity(ct, window=(300, -100))


# --------------------------------------------------------------------------- errors


def test_missing_and_wrong_format_files(tmp_path: Path) -> None:
    with pytest.raises(VoxregError) as excinfo:
        io.load_image(tmp_path / "absent.nii.gz")
    assert_one_line_error(excinfo, "absent.nii.gz", "not found")
    for name in ("fake.nii.gz", "fake.nii", "fake.mgz", "fake.nrrd", "fake.mha", "fake.npz"):
        (tmp_path / name).write_text("this is not an image\n")
        with pytest.raises(VoxregError) as excinfo:
            io.load_image(tmp_path / name)
        assert_one_line_error(excinfo, name, "cannot read")
    (tmp_path / "pic.png").write_bytes(b"\x89PNG")
    with pytest.raises(VoxregError) as excinfo:
        io.load_image(tmp_path / "pic.png")
    assert_one_line_error(excinfo, "pic.png", "unsupported")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(VoxregError) as excinfo:
        io.load_image(tmp_path / "empty_dir")
    assert_one_line_error(excinfo, "empty_dir", "no DICOM series")


def test_bad_shapes_and_values(tmp_path: Path) -> None:
    affine = np.eye(4)
    cases = {
        "movie.nii.gz": (np.zeros((6, 5, 4, 3), np.float32), False, "4D volume with 3 frames; pass a single 3D volume"),
        "line.nii.gz": (np.zeros((7,), np.float32), False, "1D"),
        "nan.nii.gz": (np.where(np.eye(5)[..., None] > 0, np.nan, 1.0).repeat(3, 2).astype(np.float32), False, "NaN"),
        "soft.nii.gz": (np.full((4, 4, 3), 0.5, np.float32), True, "non-integer"),
    }
    for name, (data, label, words) in cases.items():
        nifti(tmp_path / name, data, affine)
        with pytest.raises(VoxregError) as excinfo:
            io.load_image(tmp_path / name, label=label)
        assert_one_line_error(excinfo, name, words)
    np.savez(tmp_path / "many.npz", a=np.zeros((3, 3)), b=np.ones((3, 3)))
    with pytest.raises(VoxregError) as excinfo:
        io.load_image(tmp_path / "many.npz")
    assert_one_line_error(excinfo, "many.npz", "no image array")


def test_check_intensity_image() -> None:
    io.check_intensity_image(Image(np.arange(8, dtype=np.float32).reshape(2, 4), path=Path("ok.nii")))
    with pytest.raises(VoxregError) as excinfo:
        io.check_intensity_image(Image(np.zeros((3, 3, 3), np.float32), path=Path("/d/blank.nii.gz")))
    assert_one_line_error(excinfo, "blank.nii.gz", "empty")
    with pytest.raises(VoxregError) as excinfo:
        io.check_intensity_image(Image(np.full((3, 3, 3), 4.0, np.float32), path=Path("flat.nii.gz")))
    assert_one_line_error(excinfo, "flat.nii.gz", "constant")


def test_field_and_affine_file_errors(tmp_path: Path) -> None:
    image_path = io.save_image(random_image(np.random.default_rng(9)), tmp_path / "image.nii.gz")
    with pytest.raises(VoxregError) as excinfo:
        io.load_field(image_path)
    assert_one_line_error(excinfo, "image.nii.gz", "not a voxreg displacement field")
    (tmp_path / "rigid.txt").write_text(
        "#Insight Transform File V1.0\n#Transform 0\n"
        "Transform: Euler3DTransform_double_3_3\nParameters: 0 0 0 0 0 0\n"
        "FixedParameters: 0 0 0 0\n"
    )
    with pytest.raises(VoxregError) as excinfo:
        io.read_itk_affine(tmp_path / "rigid.txt")
    assert_one_line_error(excinfo, "rigid.txt", "unsupported transform type")
    (tmp_path / "junk.txt").write_text("hello\n")
    with pytest.raises(VoxregError) as excinfo:
        io.read_itk_affine(tmp_path / "junk.txt")
    assert_one_line_error(excinfo, "junk.txt", "not an ITK transform")
    with pytest.raises(VoxregError) as excinfo:
        io.save_field(tmp_path / "f.nii.gz", np.zeros((3, 2, 2, 2)), Image(np.zeros(SHAPE)))
    assert "does not match" in str(excinfo.value)


# --------------------------------------------------------------------------- atomic writes


def test_ensure_output_dir(tmp_path: Path) -> None:
    created = io.ensure_output_dir(tmp_path / "a" / "b")
    assert created.is_dir() and list(created.iterdir()) == []
    (tmp_path / "file.txt").write_text("x")
    for bad in (tmp_path / "file.txt" / "sub", tmp_path / "file.txt", Path("/proc/voxreg_out")):
        with pytest.raises(VoxregError) as excinfo:
            io.ensure_output_dir(bad)
        assert_one_line_error(excinfo, f"output directory {bad} is not writable")


def test_atomic_path_renames_or_cleans_up(tmp_path: Path) -> None:
    with io.atomic_path(tmp_path / "out.nii.gz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp.name.startswith(".")
        tmp.write_text("done")
    assert (tmp_path / "out.nii.gz").read_text(encoding="utf-8") == "done"
    with pytest.raises(RuntimeError):
        with io.atomic_path(tmp_path / "broken.nii.gz") as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_save(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", failing_save)  # .nii (and .nii.gz without isal)

    def failing_stream(img, stream):
        stream.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_stream", failing_stream)  # .nii.gz through isal
    for name in ("warped.nii.gz", "warped.nii"):
        with pytest.raises(VoxregError) as excinfo:
            io.save_image(random_image(np.random.default_rng(10)), tmp_path / name)
        assert_one_line_error(excinfo, name, "disk full")
    with pytest.raises(VoxregError) as excinfo:
        io.save_image(random_image(np.random.default_rng(10)), tmp_path / "warped.png")
    assert_one_line_error(excinfo, "warped.png", "cannot save")
    assert list(tmp_path.iterdir()) == []


def test_as_label_image() -> None:
    labels = io.as_label_image(Image(np.array([[0.0, 2.0], [3.0, 1.0]]), path=Path("seg.nii.gz")))
    assert labels.array.dtype == np.int32 and labels.is_label
    np.testing.assert_array_equal(labels.array, [[0, 2], [3, 1]])
    with pytest.raises(VoxregError) as excinfo:
        io.as_label_image(Image(np.array([[0.0, 2.5]]), path=Path("soft.nii.gz")))
    assert_one_line_error(excinfo, "soft.nii.gz", "non-integer")


def test_float_labels_with_rounding_noise_are_rounded(tmp_path: Path) -> None:
    data = np.array([[0.0, 2.9999998], [1.0000001, 4.0]], np.float32)[..., None].repeat(2, 2)
    loaded = io.load_image(nifti(tmp_path / "seg.nii.gz", data, np.eye(4)), label=True)
    np.testing.assert_array_equal(loaded.array[..., 0], [[0, 3], [1, 4]])


def test_float_labels_fast_path_keeps_every_check() -> None:
    """Whole numbers stored as floats (a Fortran-ordered array, as nibabel gives) take the
    cast-and-compare path; NaN, values beyond int32 and fractions still fail or round."""
    whole = np.asfortranarray(np.arange(60, dtype=np.float32).reshape(3, 4, 5) - 7.0)
    labels = io.as_label_image(Image(whole, path=Path("seg.nii.gz"))).array
    assert labels.dtype == np.int32 and labels.flags.c_contiguous
    np.testing.assert_array_equal(labels, whole.astype(np.int64))
    for bad, reason in ((np.nan, "NaN"), (3e9, "int32"), (2.5, "non-integer")):
        data = whole.copy()
        data[1, 2, 3] = bad
        with pytest.raises(VoxregError) as excinfo:
            io.as_label_image(Image(data, path=Path("bad.nii.gz")))
        assert_one_line_error(excinfo, "bad.nii.gz", reason)


def test_itk_field_supported_only_for_planes_parallel_to_xy():
    from voxreg.core.image import Image

    flat = Image(np.zeros((4, 5), np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]))
    coronal = Image(
        np.zeros((4, 5), np.float32), np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
    )
    assert io.itk_field_supported(flat) and not io.itk_field_supported(coronal)
    with pytest.raises(VoxregError, match="tilted"):
        io.field_to_itk_image(np.zeros((2, 4, 5), np.float32), coronal)


def test_resample_pads_intensities_with_the_minimum_and_labels_with_zero():
    ct = np.full((6, 6, 6), 40.0, np.float32)
    ct[0] = -1000.0  # air somewhere in the scan: the minimum
    moving = Image(ct, np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 3.0  # fixed grid 3 mm further along x: its last 3 slices fall outside
    out = io.resample_to(moving, Image(np.zeros((6, 6, 6), np.float32), shifted))
    assert np.allclose(out.array[3:], -1000.0) and np.allclose(out.array[:2], 40.0)
    labels = Image(np.full((6, 6, 6), 7, np.int16), np.eye(4))
    out_labels = io.resample_to(labels, Image(np.zeros((6, 6, 6), np.float32), shifted))
    assert (out_labels.array[3:] == 0).all() and (out_labels.array[:3] == 7).all()


def test_nifti_gz_written_through_isal_holds_the_bytes_nibabel_writes(tmp_path: Path, monkeypatch) -> None:
    import gzip
    import sys

    from voxreg.io.files import write_nifti

    image = nib.Nifti1Image(np.random.default_rng(11).random((9, 8, 7)).astype(np.float32), np.diag([1.0, 2, 3, 1]))
    nib.save(image, str(tmp_path / "nibabel.nii.gz"))
    write_nifti(image, tmp_path / "voxreg.nii.gz")
    reference = gzip.decompress((tmp_path / "nibabel.nii.gz").read_bytes())
    assert gzip.decompress((tmp_path / "voxreg.nii.gz").read_bytes()) == reference
    assert (tmp_path / "voxreg.nii.gz").read_bytes()[4:8] == b"\0\0\0\0"  # mtime 0: same bytes every run
    monkeypatch.setitem(sys.modules, "isal", None)  # not installed: nibabel's gzip
    write_nifti(image, tmp_path / "fallback.nii.gz")
    assert gzip.decompress((tmp_path / "fallback.nii.gz").read_bytes()) == reference


def test_load_field_reorders_like_numpy_and_field_grid_reads_the_header_only(tmp_path: Path) -> None:
    """The ISA-L read and torch reordering give numpy's ``moveaxis`` of nibabel's data; the
    grid comes from the header (a file whose data is cut short still gives it)."""
    fixed = Image(np.zeros((7, 6, 5), np.float32), np.diag([1.5, 1.0, 2.0, 1.0]))
    field = np.random.default_rng(3).normal(size=(3, 7, 6, 5)).astype(np.float32)
    path = io.save_field(tmp_path / "field.nii.gz", field, fixed)
    loaded, affine = io.load_field(path)
    expected = np.moveaxis(nib.load(path).get_fdata(dtype=np.float32), -1, 0)
    assert loaded.flags.c_contiguous and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, expected)
    np.testing.assert_array_equal(loaded, field)
    np.testing.assert_allclose(affine, fixed.affine)
    raw = tmp_path / "field.nii"
    io.save_field(raw, field, fixed)
    raw.write_bytes(raw.read_bytes()[:-100])  # data cut short: the header is intact
    shape, grid_affine = io.field_grid(raw)
    assert shape == (3, 7, 6, 5)
    np.testing.assert_allclose(grid_affine, fixed.affine)
    with pytest.raises(VoxregError) as excinfo:
        io.load_field(raw)
    assert "field.nii" in str(excinfo.value)


def _field_on_rotated_grid(shape, seed):
    """(affine, fixed image, random float32 field): a 3D grid with permuted, sheared axes, or a
    2D one with a flipped axis."""
    ndim = len(shape)
    affine = np.array([[0.0, 1.2, 0.1, 3.0], [-0.9, 0.0, 0.2, -4.0], [0.0, 0.0, 1.1, 2.0], [0, 0, 0, 1]])
    if ndim == 2:
        affine = np.diag([1.3, -0.8, 1.0, 1.0])
    field = np.random.default_rng(seed).normal(size=(ndim, *shape)).astype(np.float32)
    return affine, Image(np.zeros(shape, np.float32), affine), field


@pytest.mark.parametrize("shape", [(7, 6, 5), (9, 8)])
def test_itk_vectors_from_the_nifti_order_are_the_einsum_of_the_field(shape) -> None:
    """The ITK field made from the NIfTI-ordered voxreg vectors (one matrix product, no second
    reordering) has the bits of the vectors mapped while reordering (the former path)."""
    from voxreg.io.images import RAS_TO_LPS
    from voxreg.io.transforms import vectors_last_fortran

    ndim = len(shape)
    affine, fixed, field = _field_on_rotated_grid(shape, seed=4)
    linear = (RAS_TO_LPS[:3, :3] @ affine[:3, :ndim])[:ndim].astype(np.float32)
    expected = vectors_last_fortran(field, linear)
    got = np.asarray(io.field_to_itk_image(field, fixed).dataobj)
    np.testing.assert_array_equal(got.reshape(expected.shape), expected)
    vectors = io.nifti_vectors(field, fixed)
    np.testing.assert_array_equal(vectors, np.moveaxis(field, 0, -1))


@pytest.mark.parametrize("shape", [(7, 6, 5), (9, 8)])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("isal", [True, False])
def test_fields_written_chunk_by_chunk_are_the_bytes_nibabel_writes(tmp_path, monkeypatch, shape, suffix, isal) -> None:
    """save_field / save_itk_field reorder (and map) a few voxels at a time while writing: the
    file's uncompressed bytes are those of nibabel saving the whole image (header included),
    with ISA-L or nibabel's own gzip, and the values read back are the field's."""
    import gzip

    from voxreg.io import files, transforms
    from voxreg.io.images import set_nifti_xform

    monkeypatch.setattr(transforms, "WRITE_CHUNK_VOXELS", 7)  # many chunks, slabs of one plane
    if not isal:
        monkeypatch.setattr(files, "_isal_gzip", lambda: None)
    affine, fixed, field = _field_on_rotated_grid(shape, seed=5)
    reference = nib.Nifti1Image(io.nifti_vectors(field, fixed), affine)
    set_nifti_xform(reference, affine)
    reference.header.set_intent("vector", (), name="voxreg_vox")
    cases = [
        (io.save_field, reference),
        (io.save_itk_field, io.field_to_itk_image(field, fixed)),
    ]
    for save, image in cases:
        streamed, whole = tmp_path / f"streamed{suffix}", tmp_path / f"whole{suffix}"
        save(streamed, torch.from_numpy(field), fixed)
        nib.save(image, str(whole))

        def content(path):
            data = path.read_bytes()
            return gzip.decompress(data) if suffix == ".nii.gz" else data

        assert content(streamed) == content(whole), save.__name__
    io.save_field(tmp_path / f"back{suffix}", field, fixed)
    back, back_affine = io.load_field(tmp_path / f"back{suffix}")
    np.testing.assert_array_equal(back, field)
    np.testing.assert_allclose(back_affine, affine)


def test_resample_onto_its_own_grid_copies_unless_told_not_to() -> None:
    """On its own grid resample_to returns the values unchanged: a copy by default (the caller
    may write into it), the array itself with ``copy=False`` (a reader's saving of a full-size
    copy); a shifted grid is resampled either way."""
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    image = Image(array, np.diag([2.0, 2.0, 2.0, 1.0]))
    copied = io.resample_to(image, image)
    assert copied.array is not array and np.array_equal(copied.array, array)
    assert io.resample_to(image, image, copy=False).array is array
    shifted = Image(
        np.zeros_like(array), image.affine @ np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    )
    moved = io.resample_to(image, shifted, copy=False)
    assert moved.array is not array and np.allclose(moved.array[:3], array[1:], atol=1e-4)
