"""Tests of voxreg.preprocess: the network grid, and scans of different geometry brought
onto one atlas grid (tiny synthetic phantoms, a few seconds in all)."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from voxreg import io, metrics
from voxreg.core.errors import VoxregError
from voxreg.core.image import Image
from voxreg.registration.pipeline import warp_image
from voxreg.training.preprocess import (
    MANIFEST_COLUMNS,
    atlas_outline,
    load_atlas,
    nearest_multiple,
    network_grid,
    output_names,
    preprocess,
)

ATLAS_SHAPE = (30, 34, 28)


def _phantom(shape=ATLAS_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric 'head' phantom: an ellipsoid (label 1) holding two off-centre ellipsoids
    (labels 2, 3) with different intensities; smooth float32 image and int16 labels."""
    grid = np.indices(shape, dtype=np.float32)

    def ellipsoid(centre, radii):
        return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0

    labels = np.zeros(shape, np.int16)
    labels[ellipsoid((15, 17, 14), (11, 13, 10))] = 1
    labels[ellipsoid((10, 21, 11), (5, 6, 5))] = 2
    labels[ellipsoid((20, 11, 17), (5, 5, 6))] = 3
    values = np.array([0.0, 0.5, 0.95, 0.2], np.float32)[labels]
    image = ndimage.gaussian_filter(values, 1.0) + 0.05 * grid[0] / shape[0] * (labels > 0)
    return image.astype(np.float32), labels


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _centre(image: Image) -> np.ndarray:
    index = np.r_[(np.asarray(image.shape) - 1) / 2.0, [0.0] * (3 - image.ndim), 1.0]
    return (image.affine @ index)[:3]


# --------------------------------------------------------------------------- grid


@pytest.mark.parametrize("spacing", [None, 1.5, 3.0])
def test_network_grid_multiples_and_centre(spacing):
    rotation = nib.eulerangles.euler2mat(0.3, -0.2, 0.1)
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.0, 1.2, 2.0]) @ np.diag([-1, 1, 1])
    affine[:3, 3] = [12.0, -30.0, 7.5]
    atlas = Image(np.zeros((97, 117, 45), np.float32), affine)
    grid = network_grid(atlas, spacing, multiple=16)
    assert all(s % 16 == 0 for s in grid.shape)
    np.testing.assert_allclose(_centre(grid), _centre(atlas), atol=1e-9)
    expected = atlas.spacing if spacing is None else np.full(3, spacing)
    np.testing.assert_allclose(grid.spacing, expected)
    directions = lambda a: a[:3, :3] / np.sqrt((a[:3, :3] ** 2).sum(0))  # noqa: E731
    np.testing.assert_allclose(directions(grid.affine), directions(atlas.affine), atol=1e-12)
    extent = np.asarray(atlas.shape) * atlas.spacing / expected
    assert np.all(np.abs(np.asarray(grid.shape) - extent) <= 8 + 0.5)  # nearest multiple of 16
    assert grid.array.dtype == np.float32 and not grid.array.any()


def test_network_grid_keeps_a_grid_that_already_fits():
    atlas = Image(np.ones((32, 48, 16), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    grid = network_grid(atlas, None, 16)
    assert grid.shape == atlas.shape
    np.testing.assert_allclose(grid.affine, atlas.affine, atol=1e-12)


def test_network_grid_2d_and_bad_arguments():
    grid = network_grid(Image(np.zeros((50, 70), np.float32)), 2.0, 8)
    assert grid.shape == (24, 32)
    np.testing.assert_allclose(_centre(grid), [24.5, 34.5, 0.0])
    assert nearest_multiple(24, 16) == 32 and nearest_multiple(23.9, 16) == 16 and nearest_multiple(3, 16) == 16
    with pytest.raises(VoxregError, match="spacing"):
        network_grid(Image(np.zeros((8, 8, 8))), -1.0)
    with pytest.raises(VoxregError, match="multiple"):
        network_grid(Image(np.zeros((8, 8, 8))), None, 0)


def test_mni152_atlas_follows_spacing():
    atlas = load_atlas("mni152", spacing=2.0)
    assert atlas.shape == (99, 117, 95)
    assert network_grid(atlas, 2.0, 16).shape == (96, 112, 96)


def test_output_names_are_unique():
    names = output_names(
        ["a/OAS-1/t1.nii.gz", "a/OAS-2/t1.nii.gz", "b/ct.nrrd", "c/scan.mgz", "d/scan.mgz", "e/x/dicom_dir"]
    )
    assert names == ["OAS-1_t1", "OAS-2_t1", "ct", "c_scan", "d_scan", "dicom_dir"]
    assert output_names(["x/s.nii", "x/s.nii.gz"]) == ["x_s_1", "x_s_2"]


# --------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Atlas = the phantom; scans: shifted origin, flipped axes (as_reoriented), 2 mm voxels,
    and a constant (broken) scan."""
    tmp = tmp_path_factory.mktemp("preprocess")
    image, labels = _phantom()
    atlas = _save(tmp / "atlas.nii.gz", image, np.eye(4))
    shifted = np.eye(4)
    shifted[:3, 3] = [4.0, -3.0, 2.0]
    scans = [_save(tmp / "shifted.nii.gz", image, shifted)]
    label_files = [_save(tmp / "shifted_labels_in.nii.gz", labels, shifted)]
    ornt = np.array([[1, -1], [0, 1], [2, -1]])  # axes swapped and flipped, same world content
    scans.append(tmp / "flipped.nii.gz")
    label_files.append(tmp / "flipped_labels_in.nii.gz")
    nib.save(nib.Nifti1Image(image, shifted).as_reoriented(ornt), str(scans[-1]))
    nib.save(nib.Nifti1Image(labels, shifted).as_reoriented(ornt), str(label_files[-1]))
    two = np.diag([2.0, 2.0, 2.0, 1.0])
    scans.append(_save(tmp / "coarse.nii.gz", np.ascontiguousarray(image[::2, ::2, ::2]), two))
    label_files.append(_save(tmp / "coarse_labels_in.nii.gz", np.ascontiguousarray(labels[::2, ::2, ::2]), two))
    scans.append(_save(tmp / "broken.nii.gz", np.full((16, 16, 16), 3.0, np.float32), np.eye(4)))
    label_files.append(None)
    calls = []
    result = preprocess(
        scans, tmp / "out", atlas=atlas, labels=label_files, progress=lambda done, total: calls.append((done, total))
    )
    return {
        "result": result,
        "atlas": Image(image, np.eye(4)),
        "labels": Image(labels, np.eye(4)),
        "calls": calls,
        "out": tmp / "out",
    }


def test_outputs_share_the_network_grid(run):
    result = run["result"]
    assert result.grid.shape == (32, 32, 32)  # 30, 34, 28 -> nearest multiples of 16
    for record in result.outputs[:3]:
        image = io.load_image(record.image)
        labels = io.load_image(record.labels, label=True)
        for img in (image, labels):
            assert img.shape == result.grid.shape
            np.testing.assert_allclose(img.affine, result.grid.affine, atol=1e-5)
        assert image.array.min() >= 0.0 and image.array.max() <= 1.0 + 1e-6
    assert sorted(p.name for p in run["out"].iterdir()) == sorted(
        ["manifest.csv", "summary.png"]
        + [f"{n}{s}.nii.gz" for n in ("shifted", "flipped", "coarse") for s in ("", "_labels")]
    )


def test_aligned_scans_match_the_atlas(run):
    result = run["result"]
    atlas = io.normalize_intensity(warp_image(run["atlas"], result.grid).array)
    atlas_labels = warp_image(run["labels"], result.grid).array
    for record in result.outputs[:3]:
        image = io.load_image(record.image).array
        assert np.corrcoef(image.ravel(), atlas.ravel())[0, 1] > 0.9, record.source
        assert record.affine_ncc_after > 0.9
        labels = io.load_image(record.labels, label=True).array
        assert np.issubdtype(labels.dtype, np.integer) and set(np.unique(labels)) <= {0, 1, 2, 3}
        dice = metrics.dice_per_label(atlas_labels, labels, [1, 2, 3])
        assert np.mean(list(dice.values())) > 0.8, (record.source, dice)
    assert result.outputs[0].affine_ncc_before < result.outputs[0].affine_ncc_after  # shift undone


def test_manifest_and_failed_scan(run):
    result = run["result"]
    with open(result.manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0].keys()) == MANIFEST_COLUMNS
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert [r["image"] for r in rows] == ["shifted.nii.gz", "flipped.nii.gz", "coarse.nii.gz", ""]
    assert rows[0]["labels"] == "shifted_labels.nii.gz" and rows[3]["labels_source"] == ""
    assert "constant" in rows[3]["error"] and "broken.nii.gz" in rows[3]["error"]
    assert all(float(r["affine_ncc_after"]) > 0.9 for r in rows[:3])
    assert all(float(r["seconds"]) >= 0 for r in rows)
    broken = result.outputs[3]
    assert broken.status == "failed" and broken.image is None and np.isnan(broken.affine_ncc_after)
    assert run["calls"] == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]


def test_summary_png(run):
    data = run["result"].summary.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 150


def test_window_and_mask_labels(tmp_path):
    image, labels = _phantom()
    hu = image * 1000.0 - 500.0  # CT-like values
    scan = _save(tmp_path / "ct.nii.gz", hu, np.eye(4))
    lab = _save(tmp_path / "ct_labels.nii.gz", labels, np.eye(4))
    atlas = Image(image, np.eye(4))
    result = preprocess([scan], tmp_path / "out", atlas=atlas, labels=[lab], mask_labels=True, window=(-400.0, 400.0))
    assert result.outputs[0].status == "ok"
    out = io.load_image(result.outputs[0].image).array
    on_grid = warp_image(Image(hu, np.eye(4)), result.grid).array
    grid_labels = io.load_image(result.outputs[0].labels, label=True).array
    inside = grid_labels > 0
    expected = np.clip((on_grid + 400.0) / 800.0, 0.0, 1.0)
    assert np.abs(out[inside] - expected[inside]).mean() < 0.05
    assert (out[inside] >= 0.999).mean() > 0.01  # label 2 (450 HU) clipped to the window top
    assert 0.1 < np.median(out[grid_labels == 1]) < 0.9  # label 1 (0 HU) mid-window, not clipped
    assert not out[~inside].any()  # masked outside the labels


def test_atlas_outline_is_a_smooth_mask():
    image, _ = _phantom()
    outline = atlas_outline(io.normalize_intensity(image))
    assert 0.0 <= outline.min() and outline.max() <= 1.0
    assert outline[15, 17, 14] > 0.99 and outline[0, 0, 0] < 0.01


def test_bad_arguments_fail_early(tmp_path):
    scan = _save(tmp_path / "s.nii.gz", _phantom()[0], np.eye(4))
    with pytest.raises(VoxregError, match="labels"):
        preprocess([scan, scan], tmp_path / "out", atlas=scan, labels=[None])
    with pytest.raises(VoxregError, match="similarity"):
        preprocess([scan], tmp_path / "out", atlas=scan, similarity="bogus")
    with pytest.raises(VoxregError, match="window"):
        preprocess([scan], tmp_path / "out", atlas=scan, window=(5.0, 1.0))
    with pytest.raises(VoxregError, match="no scans"):
        preprocess([], tmp_path / "out", atlas=scan)
    with pytest.raises(VoxregError, match="not found"):
        preprocess([scan], tmp_path / "out", atlas=tmp_path / "missing.nii.gz")
    assert not (tmp_path / "out").exists()


def test_2d_scans(tmp_path):
    image = np.ascontiguousarray(_phantom()[0][:, :, 14])  # 30 x 34
    shifted = np.eye(4)
    shifted[:2, 3] = [3.0, -2.0]
    atlas = _save(tmp_path / "atlas.nii.gz", image, np.eye(4))
    scan = _save(tmp_path / "scan.nii.gz", image, shifted)
    result = preprocess([scan], tmp_path / "out", atlas=atlas, multiple=8)
    assert result.grid.shape == (32, 32)
    assert result.outputs[0].status == "ok" and result.outputs[0].affine_ncc_after > 0.99
    assert result.summary.is_file()
