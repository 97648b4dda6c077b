"""End-to-end API: register() in world coordinates, outputs that SimpleITK reproduces."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import smooth_volume
from voxreg import io
from voxreg.core import spatial
from voxreg.core.image import Image
from voxreg.registration import pipeline as api
from voxreg.registration.instance import AlignConfig

# smooth synthetic images are locally linear, where local NCC cannot see a shift: use MSE
FAST = AlignConfig(similarity="mse", scales=(2, 1), iterations=(40, 20), lr=0.1)


def oblique_affine(spacing=(1.2, 1.0, 1.5), angle=0.2, origin=(-10.0, 5.0, 3.0)) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def test_moving_on_another_grid_is_resampled_in_world_space(tmp_path):
    """A moving scan stored flipped/permuted with another voxel size is brought onto the
    fixed grid through world coordinates before registration: the identity remains."""
    fixed = Image(smooth_volume((20, 24, 18), seed=3), oblique_affine())
    reoriented = nib.Nifti1Image(fixed.array, fixed.affine).as_reoriented(np.array([[1, -1], [0, 1], [2, -1]]))
    moving = Image(np.asarray(reoriented.dataobj, dtype=np.float32), reoriented.affine)
    on_fixed = api.warp_image(moving, fixed)
    assert np.abs(on_fixed.array - fixed.array).max() < 1e-4


def test_itk_field_applied_by_simpleitk_matches_voxreg_warp(tmp_path):
    fixed_array = smooth_volume((22, 26, 20), seed=4)
    fixed = Image(fixed_array, oblique_affine())
    shift = torch.zeros(1, 3, 22, 26, 20)
    shift[:, 1] = 1.5
    moving = Image(spatial.warp(torch.from_numpy(fixed_array)[None, None], -shift)[0, 0].numpy(), fixed.affine)
    result = api.register(fixed, moving, device="cpu", config=FAST, affine=False)
    outputs = result.save(tmp_path, figure=False)
    ref = io.array_to_sitk(fixed.array, fixed.affine)
    mov = io.array_to_sitk(moving.array, moving.affine)
    field = sitk.ReadImage(str(outputs["field_itk"]))
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    by_itk = sitk.Resample(mov, ref, transform, sitk.sitkLinear, 0.0)
    itk_array = io.sitk_to_array(by_itk)[0]
    voxreg_array = nib.load(outputs["warped"]).get_fdata()
    interior = (slice(4, -4),) * 3  # away from points mapped outside the moving image
    assert np.abs(itk_array[interior] - voxreg_array[interior]).max() < 1e-3
    # and the registration recovered most of the 1.5-voxel shift
    assert abs(float(result.field[0, 1, 6:-6, 6:-6, 6:-6].median()) - 1.5) < 0.3


def test_register_accepts_2d_images():
    fixed = smooth_volume((48, 40), seed=5)
    moving = np.roll(fixed, 2, axis=1)
    result = api.register(Image(fixed), Image(moving), device="cpu", config=FAST)
    assert result.field.shape == (1, 2, 48, 40)
    assert result.metrics["similarity"]["mse_after"] < 0.3 * result.metrics["similarity"]["mse_before"]


def test_apply_field_reproduces_register_output(tmp_path):
    fixed = Image(smooth_volume((20, 22, 18), seed=6))
    moving = Image(np.roll(fixed.array, 1, axis=2))
    result = api.register(fixed, moving, device="cpu", config=FAST, affine=False)
    outputs = result.save(tmp_path, figure=False)
    again = api.apply_field(outputs["field"], moving)
    assert np.abs(again.array - result.warped.array).max() < 1e-5


def test_simpleitk_composite_of_affine_and_field_matches_voxreg(tmp_path):
    """Raw pair (moving stored with a rotated, shifted header): register() runs affine then
    deformable; SimpleITK applying affine.txt after field_itk gives voxreg's warped image."""
    fixed_array = smooth_volume((26, 28, 24), seed=7)
    fixed = Image(fixed_array, oblique_affine(angle=0.0, spacing=(1.5, 1.5, 1.5)))
    angle = np.deg2rad(8.0)
    motion = np.eye(4)
    motion[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    motion[:3, 3] = [3.0, -2.0, 1.5]
    moving = Image(fixed_array.copy(), motion @ fixed.affine)
    result = api.register(fixed, moving, device="cpu", config=FAST)
    assert result.world_matrix is not None
    outputs = result.save(tmp_path, figure=False)
    affine = sitk.ReadTransform(str(outputs["affine"]))
    field = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(str(outputs["field_itk"])), sitk.sitkVectorFloat64)
    )
    composite = sitk.CompositeTransform([affine, field])  # applied last-first: field, then affine
    by_itk = sitk.Resample(
        io.array_to_sitk(moving.array, moving.affine),
        io.array_to_sitk(fixed.array, fixed.affine),
        composite,
        sitk.sitkLinear,
        0.0,
    )
    interior = (slice(4, -4),) * 3
    voxreg_warped = nib.load(outputs["warped"]).get_fdata()
    assert np.abs(io.sitk_to_array(by_itk)[0][interior] - voxreg_warped[interior]).max() < 1e-3
    # and the composite undoes the motion: the warped scan matches the fixed one
    assert np.abs(voxreg_warped[interior] - fixed_array[interior]).mean() < 0.02


def tilted_2d_affine() -> np.ndarray:
    """A 2D slice whose plane is tilted out of world x-y (no ITK 2D field possible)."""
    c, s = np.cos(0.4), np.sin(0.4)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return affine


def test_save_leaves_metrics_unchanged(tmp_path):
    import copy
    import json

    fixed = Image(smooth_volume((32, 28), seed=7), tilted_2d_affine())
    moving = Image(np.roll(fixed.array, 1, axis=0), fixed.affine)
    result = api.register(fixed, moving, device="cpu", config=FAST, affine=False)
    before = copy.deepcopy(result.metrics)
    outputs = result.save(tmp_path, figure=False)
    assert result.metrics == before
    assert "field_itk" not in outputs
    saved = json.loads(outputs["metrics"].read_text(encoding="utf-8"))
    assert saved["field_itk"].startswith("not written")  # the note goes to metrics.json only


def test_metrics_false_returns_transforms_without_measures(tmp_path):
    fixed = Image(smooth_volume((20, 22, 18), seed=8))
    moving = Image(np.roll(fixed.array, 1, axis=2))
    labels = Image((fixed.array > fixed.array.mean()).astype(np.int16))
    fast = api.register(
        fixed,
        moving,
        device="cpu",
        config=FAST,
        affine=False,
        metrics=False,
        moving_labels={"seg": labels},
        fixed_labels=labels,
    )
    full = api.register(
        fixed, moving, device="cpu", config=FAST, affine=False, moving_labels={"seg": labels}, fixed_labels=labels
    )
    assert "similarity" not in fast.metrics and "dice_mean_after" not in fast.metrics
    assert "folding_percent" not in fast.metrics and "pipeline_seconds" in fast.metrics
    assert "seg" in fast.warped_labels
    torch.testing.assert_close(fast.field, full.field)
    measured = api.measure_registration(fast, fixed_labels=labels, moving_labels={"seg": labels})
    assert measured["similarity"] == full.metrics["similarity"]
    assert measured["dice_mean_after"] == full.metrics["dice_mean_after"]
    assert fast.save(tmp_path, figure=False)["metrics"].exists()


def test_saved_validation_lambda_reads_the_train_config_dict():
    assert api.saved_validation_lambda(None) == 1.0
    assert api.saved_validation_lambda({"lam": 0.5}) == 0.5
    assert api.saved_validation_lambda({"lam": 0.5, "lam_range": [0.1, 10.0]}) == pytest.approx(1.0)
