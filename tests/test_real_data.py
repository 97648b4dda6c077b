"""Real scans from ../shared/data (skipped with a reason when absent): affine accuracy on
manually labelled brains, world-space handling of real headers, ITK export on a real pair."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from conftest import shared_path
from voxreg import io, metrics
from voxreg.registration import pipeline as api
from voxreg.registration.affine import affine_register
from voxreg.registration.instance import AlignConfig

EXCLUDED = {0, 74}


def mean_dice(fixed: np.ndarray, warped: np.ndarray) -> float:
    labels = sorted((set(np.unique(fixed)) & set(np.unique(warped))) - EXCLUDED)
    return float(np.nanmean(list(metrics.dice_per_label(fixed, warped, labels).values())))


def test_mindboggle_affine_reaches_ants_affine_dice():
    """ANTs affine reaches mean Dice 0.41 on subjects 2 -> 1 (measured on this machine)."""
    folder = shared_path("brain_mri", "mindboggle_oasis_trt20")
    fixed = io.load_image(folder / "OASIS-TRT-20-1" / "t1weighted_brain.nii.gz")
    moving = io.load_image(folder / "OASIS-TRT-20-2" / "t1weighted_brain.nii.gz")
    fixed_labels = io.load_image(folder / "OASIS-TRT-20-1" / "labels_DKT31_CMA.nii.gz", label=True)
    moving_labels = io.load_image(folder / "OASIS-TRT-20-2" / "labels_DKT31_CMA.nii.gz", label=True)
    result = affine_register(fixed, moving)
    before = mean_dice(fixed_labels.array, api.warp_image(moving_labels, fixed).array)
    after = mean_dice(fixed_labels.array, api.warp_image(moving_labels, fixed, world_matrix=result.world_matrix).array)
    assert before < 0.1
    assert after > 0.39


def test_voxelmorph_scan_header_and_labels():
    folder = shared_path("brain_mri", "voxelmorph_test_scan")
    image = io.load_image(folder / "test_scan_vol.nii.gz")
    labels = io.load_image(folder / "test_scan_seg.nii.gz", label=True)
    assert image.shape == labels.shape == (160, 192, 224)
    assert "".join(__import__("nibabel").aff2axcodes(image.affine)) == "LIA"
    assert np.issubdtype(labels.array.dtype, np.integer) and 17 in np.unique(labels.array)


def test_real_pair_itk_field_matches_voxreg_warp(tmp_path):
    """A short registration of the OASIS pair: SimpleITK applying field_itk reproduces warped."""
    folder = shared_path("brain_mri", "lapirn_oasis_aligned_pair")
    fixed_path, moving_path = folder / "image_A_fullsize.nii.gz", folder / "image_B_fullsize.nii.gz"
    quick = AlignConfig(scales=(4, 2), iterations=(30, 10))
    result = api.register(fixed_path, moving_path, config=quick, device="cpu", affine=False)
    assert result.metrics["similarity"]["ncc_after"] > result.metrics["similarity"]["ncc_before"] + 0.05
    outputs = result.save(tmp_path, figure=False)
    fixed, moving = io.load_image(fixed_path), io.load_image(moving_path)
    field = sitk.ReadImage(str(outputs["field_itk"]))
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    by_itk = sitk.Resample(
        io.array_to_sitk(moving.array, moving.affine),
        io.array_to_sitk(fixed.array, fixed.affine),
        transform,
        sitk.sitkLinear,
        0.0,
    )
    difference = np.abs(io.sitk_to_array(by_itk)[0] - result.warped.array)
    assert difference.max() < 1e-3
    assert torch.isfinite(result.field).all()


def test_shipped_brain_model_alone_improves_a_held_out_mindboggle_pair():
    """The shipped model (synthetic training only) on real held-out subjects 2 -> 1, native
    1 mm, affine first: Dice 0.417 (affine) -> 0.503 (network alone, step 6,183), measured 2026-11-30."""
    folder = shared_path("brain_mri", "mindboggle_oasis_trt20")
    fixed = folder / "OASIS-TRT-20-1" / "t1weighted_brain.nii.gz"
    moving = folder / "OASIS-TRT-20-2" / "t1weighted_brain.nii.gz"
    labels = {"labels": folder / "OASIS-TRT-20-2" / "labels_DKT31_CMA.nii.gz"}
    truth = io.load_image(folder / "OASIS-TRT-20-1" / "labels_DKT31_CMA.nii.gz", label=True).array
    affine = api.register(fixed, moving, affine_only=True, moving_labels=labels, metrics=False, device="cpu")
    network = api.register(
        fixed,
        moving,
        model="brain",
        refine=0,
        world_matrix=affine.world_matrix,
        moving_labels=labels,
        metrics=False,
        device="cpu",
    )
    before = mean_dice(truth, affine.warped_labels["labels"].array)
    after = mean_dice(truth, network.warped_labels["labels"].array)
    assert 0.40 < before < 0.43
    assert after > before + 0.05
    assert metrics.jacobian_stats(network.field)["folding_percent"] < 0.1
