"""Rigid/affine registration in world space (voxreg.affine) on small synthetic phantoms.

Accuracy is measured as the largest distance (mm) between ``W_est @ p`` and
``W_true @ p`` over the corners ``p`` of the fixed field of view (a 96 mm cube for the
48^3 x 2 mm phantom, so 1 mm there is ~0.7 degrees of rotation error).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from voxreg import io, losses
from voxreg.core.errors import VoxregError
from voxreg.core.image import Image
from voxreg.io import templates
from voxreg.registration.affine import AffineConfig, AffineResult, affine_register, mattes_mi

SHAPE = (48, 48, 48)
SPACING = 2.0


def phantom(shape=SHAPE, spacing=SPACING, seed=0, affine=None) -> Image:
    """Smooth asymmetric phantom: an ellipsoid 'body' plus bright blobs, zero background,
    centred on the world origin (everything inside +-35 mm)."""
    rng = np.random.default_rng(seed)
    if affine is None:
        affine = np.diag([spacing] * len(shape) + [1.0] * (4 - len(shape)))
        affine[: len(shape), 3] = -spacing * (np.asarray(shape) - 1) / 2
    ndim = len(shape)
    index = np.indices(shape).reshape(ndim, -1)
    world = (affine[:ndim, :ndim] @ index + affine[:ndim, 3:4]).T
    radii = np.array([30.0, 24.0, 18.0])[:ndim]
    out = 0.5 / (1 + np.exp((np.sqrt(((world / radii) ** 2).sum(1)) - 1) * 12))
    for _ in range(6):
        centre = rng.uniform(-16, 16, ndim) * np.array([1.0, 0.8, 0.6])[:ndim]
        width = rng.uniform(4, 8)
        out += rng.uniform(0.3, 0.8) * np.exp(-((world - centre) ** 2).sum(1) / (2 * width**2))
    return Image(out.reshape(shape).astype(np.float32), affine)


def world_transform(degrees=(0.0, 0.0, 0.0), shift=(0.0, 0.0, 0.0), scales=(1.0, 1.0, 1.0)) -> np.ndarray:
    """4x4 RAS matrix ``p -> R @ diag(scales) @ p + shift``."""
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix() @ np.diag(scales)
    matrix[:3, 3] = shift
    return matrix


def transformed(image: Image, world: np.ndarray, target: Image | None = None) -> Image:
    """Moving scan for which ``world`` (fixed -> moving points) is the true alignment:
    ``moving(q) = image(world^-1 q)``, on ``target``'s grid (default: ``image``'s)."""
    target = image if target is None else target
    return io.resample_to(image, target, world_matrix=np.linalg.inv(world))


def corner_error(estimate: np.ndarray, truth: np.ndarray, image: Image) -> float:
    """Largest distance (mm) between the two transforms over the corners of ``image``."""
    shape = np.asarray(image.shape)
    corners = np.array(list(np.ndindex(*([2] * image.ndim)))).T * (shape[:, None] - 1)
    count = corners.shape[1]
    corners = np.vstack([corners, np.zeros((3 - image.ndim, count)), np.ones((1, count))])
    points = image.affine @ corners
    return float(np.linalg.norm((estimate @ points - truth @ points)[:3], axis=0).max())


def ncc(a: Image, b: Image) -> float:
    tensors = [torch.from_numpy(image.array)[None, None] for image in (a, b)]
    return float(losses.global_ncc(*tensors))


@pytest.fixture(scope="module")
def fixed() -> Image:
    return phantom()


@pytest.fixture(scope="module")
def rigid_case(fixed):
    """15 degrees about an oblique axis and a 10 mm shift, recovered with 'rigid'."""
    truth = world_transform((12.0, -6.0, 7.0), (10.0, -3.0, 2.0))
    moving = transformed(fixed, truth)
    return truth, moving, affine_register(fixed, moving, AffineConfig(transform="rigid"))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value", [("transform", "similarity"), ("similarity", "mse"), ("init", "random"), ("scale_unit", "vox")]
)
def test_config_rejects_unknown_names_listing_choices(field, value):
    with pytest.raises(ValueError, match=field) as info:
        AffineConfig(**{field: value})
    allowed = {
        "transform": "rigid, affine",
        "similarity": "ncc, mi",
        "init": "moments, com, identity",
        "scale_unit": "mm, factor",
    }[field]
    assert allowed in str(info.value)


def test_config_rejects_mismatched_levels():
    with pytest.raises(ValueError, match="same length|equal length"):
        AffineConfig(scales=(8.0, 4.0), iterations=(10,))


# --------------------------------------------------------------------------- accuracy


def test_rigid_transform_recovered_within_1mm(fixed, rigid_case):
    truth, _, result = rigid_case
    assert isinstance(result, AffineResult)
    assert result.world_matrix.shape == (4, 4) and result.world_matrix.dtype == np.float64
    assert np.degrees(np.arccos((np.trace(truth[:3, :3]) - 1) / 2)) > 14.0  # the case is hard enough
    assert corner_error(result.world_matrix, truth, fixed) < 1.0
    assert result.similarity_after > 0.99 > result.similarity_before
    assert result.seconds > 0 and result.init and result.history


def test_result_aligns_with_resample_to(fixed, rigid_case):
    truth, moving, result = rigid_case
    before = ncc(fixed, io.resample_to(moving, fixed))
    after = ncc(fixed, io.resample_to(moving, fixed, world_matrix=result.world_matrix))
    assert before < 0.85 and after > 0.995


def test_itk_affine_round_trip(tmp_path, rigid_case):
    result = rigid_case[2]
    path = io.write_itk_affine(tmp_path / "affine.txt", result.world_matrix)
    np.testing.assert_allclose(io.read_itk_affine(path), result.world_matrix, atol=1e-9)


def test_itk_affine_file_holds_lps_parameters(tmp_path):
    """Not a self round trip: a RAS translation of (+10, +5, -3) mm is the LPS translation
    (-10, -5, -3) in the file (x and y flip sign, z does not), and a RAS rotation about z
    keeps its sign pattern. A symmetric RAS/LPS mix-up on write and read would pass a round
    trip but fails here."""
    t = np.radians(30.0)
    matrix = np.eye(4)
    matrix[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    matrix[:3, 3] = [10.0, 5.0, -3.0]
    path = io.write_itk_affine(tmp_path / "affine.txt", matrix)
    line = next(ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.startswith("Parameters:"))
    params = np.array([float(v) for v in line.split(":")[1].split()])
    # diag(-1,-1,1) R diag(-1,-1,1) == R for a rotation about z; translation -> (-10, -5, -3)
    np.testing.assert_allclose(params[:9].reshape(3, 3), matrix[:3, :3], atol=1e-12)
    np.testing.assert_allclose(params[9:], [-10.0, -5.0, -3.0], atol=1e-12)


def test_reoriented_oblique_copy_registers_to_identity():
    """Same content in world space, stored with flipped/permuted axes (as_reoriented),
    an oblique affine and an origin far off: the answer is the identity."""
    oblique = world_transform((20.0, 0.0, -15.0), (40.0, -25.0, 60.0)) @ np.diag([SPACING] * 3 + [1.0])
    oblique[:3, 3] -= oblique[:3, :3] @ ((np.asarray(SHAPE) - 1) / 2)  # keep the content at the origin
    fixed = phantom(affine=oblique)
    ornt = np.array([[2, -1], [0, 1], [1, -1]])  # axis 2 flipped -> axis 0, 0 -> 1, 1 flipped -> 2
    img = nib.Nifti1Image(fixed.array, fixed.affine).as_reoriented(ornt)
    moving = Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    assert moving.shape != fixed.shape or not np.allclose(moving.affine, fixed.affine)
    result = affine_register(fixed, moving, AffineConfig(transform="rigid"))
    assert corner_error(result.world_matrix, np.eye(4), fixed) < 0.5


def test_shifted_origin_gives_that_translation(fixed):
    """Moving the origin of a copy by (15, -8, 5) mm moves its content by that much."""
    moving = Image(fixed.array.copy(), fixed.affine.copy())
    moving.affine[:3, 3] += [15.0, -8.0, 5.0]
    result = affine_register(fixed, moving, AffineConfig(transform="rigid"))
    truth = world_transform(shift=(15.0, -8.0, 5.0))
    assert corner_error(result.world_matrix, truth, fixed) < 0.5


def test_anisotropic_moving_voxels(fixed, rigid_case):
    """A 1 x 1 x 3 mm copy (the rigid case resampled): same answer within 1.5 mm."""
    truth, moving, _ = rigid_case
    grid = np.diag([1.0, 1.0, 3.0, 1.0])
    grid[:3, 3] = -(np.array([96, 96, 32]) - 1) / 2 * np.array([1.0, 1.0, 3.0])
    aniso = io.resample_to(moving, Image(np.zeros((96, 96, 32), np.float32), grid))
    assert np.allclose(aniso.spacing, [1, 1, 3])
    result = affine_register(fixed, aniso, AffineConfig(transform="rigid"))
    assert corner_error(result.world_matrix, truth, fixed) < 1.5


def test_affine_recovers_scaling_that_rigid_cannot(fixed):
    """10% scaling along x (and -6% along y) with a rotation: 'affine' recovers it within
    1 mm, 'rigid' is left several mm off."""
    truth = world_transform((0.0, 0.0, 10.0), (4.0, 3.0, -2.0), scales=(1.10, 0.94, 1.0))
    moving = transformed(fixed, truth)
    affine = affine_register(fixed, moving, AffineConfig(transform="affine"))
    rigid = affine_register(fixed, moving, AffineConfig(transform="rigid"))
    assert corner_error(affine.world_matrix, truth, fixed) < 1.0
    assert corner_error(rigid.world_matrix, truth, fixed) > 3.0
    assert affine.similarity_after > rigid.similarity_after
    np.testing.assert_allclose(np.linalg.svd(affine.world_matrix[:3, :3])[1], [1.10, 1.0, 0.94], atol=0.01)


def test_principal_axes_start_finds_large_rotation(fixed):
    """A 150 degree rotation is out of reach of local optimisation from the identity; the
    principal-axes candidates bring it back."""
    truth = world_transform((0.0, 0.0, 150.0), (5.0, 0.0, 0.0))
    moving = transformed(fixed, truth)
    result = affine_register(fixed, moving, AffineConfig(transform="rigid"))
    assert result.init.startswith("moments")
    assert corner_error(result.world_matrix, truth, fixed) < 1.0


def test_mutual_information_aligns_remapped_intensities(fixed):
    """MI handles a non-monotonic intensity remapping (a crude 'other modality')."""
    truth = world_transform((8.0, 0.0, -6.0), (-6.0, 4.0, 0.0))
    moving = transformed(fixed, truth)
    remapped = moving.with_array(np.where(moving.array > 0.05, 1.2 - moving.array, 0.0).astype(np.float32))
    result = affine_register(fixed, remapped, AffineConfig(transform="rigid", similarity="mi"))
    assert corner_error(result.world_matrix, truth, fixed) < 1.0
    assert result.similarity_after > result.similarity_before


def test_two_dimensional_images():
    fixed = phantom(shape=(64, 56), spacing=1.5)
    truth = np.eye(4)
    angle = np.radians(20.0)
    truth[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    truth[:2, 3] = [6.0, -4.0]
    moving = transformed(fixed, truth)
    result = affine_register(fixed, moving, AffineConfig(transform="rigid"))
    np.testing.assert_allclose(result.world_matrix[2], [0, 0, 1, 0])
    assert corner_error(result.world_matrix, truth, fixed) < 1.0


def test_two_dimensional_slice_outside_the_xy_plane():
    """A coronal 2D slice (voxel axes along world -x and -z, like OASIS 2D NIfTI files)
    shifted within its plane: the shift is recovered and nothing leaves the plane."""
    flat = phantom(shape=(64, 56), spacing=1.5)
    coronal = np.array([[-1.5, 0, 0, 48.0], [0, 0, 1.0, -0.5], [0, -1.5, 0, 42.0], [0, 0, 0, 1]])
    fixed = Image(flat.array, coronal)
    shift = np.array([4.0, 0.0, -6.0])
    moving_affine = coronal.copy()
    moving_affine[:3, 3] += shift
    result = affine_register(fixed, Image(flat.array, moving_affine), AffineConfig(transform="rigid"))
    corners = np.array([[i, j, 0, 1] for i in (0, 63) for j in (0, 55)], dtype=float).T
    world = coronal @ corners
    error = np.linalg.norm((result.world_matrix @ world)[:3] - (world[:3] + shift[:, None]), axis=0)
    assert error.max() < 1.0, error
    np.testing.assert_allclose(result.world_matrix[1], [0, 1, 0, 0], atol=1e-9)  # y is the plane normal


def test_mni152_template_rigid():
    """Realistic anatomy: the 2 mm MNI152 template against a rotated, shifted copy."""
    template = templates.mni152_template(2)  # nilearn is a dependency: no skip
    truth = world_transform((10.0, -5.0, 8.0), (8.0, -6.0, 5.0))
    moving = transformed(template, truth)
    result = affine_register(template, moving, AffineConfig(transform="rigid"))
    assert corner_error(result.world_matrix, truth, template) < 1.0


# --------------------------------------------------------------------------- masks, progress, errors


def test_masks_exclude_distractors(fixed, rigid_case):
    """A bright block present in only one scan pulls the alignment far off (tens of mm
    without a mask); masking it out on that scan's grid restores a sub-mm result."""
    truth, moving, _ = rigid_case
    array = fixed.array.copy()
    array[30:46, 2:18, 2:18] = 1.0
    fixed_mask = np.ones(SHAPE, bool)
    fixed_mask[28:, :20, :20] = False
    result = affine_register(fixed.with_array(array), moving, AffineConfig(transform="rigid"), fixed_mask=fixed_mask)
    assert corner_error(result.world_matrix, truth, fixed) < 1.0

    array = moving.array.copy()
    array[2:18, 30:46, 30:46] = 1.0
    moving_mask = Image(np.ones(SHAPE, np.uint8), moving.affine)
    moving_mask.array[:20, 28:, 28:] = 0
    result = affine_register(fixed, moving.with_array(array), AffineConfig(transform="rigid"), moving_mask=moving_mask)
    assert corner_error(result.world_matrix, truth, fixed) < 1.0


@pytest.mark.parametrize(
    ("rigid_levels", "rigid_steps"), [(1, 5), (2, 5 + 3), (3, 5 + 3 + 2)]
)  # the rigid stage runs on the coarsest rigid_levels levels, then the affine stage on all
def test_progress_reports_every_step(fixed, rigid_case, rigid_levels, rigid_steps):
    calls = []
    config = AffineConfig(transform="affine", iterations=(5, 3, 2), init_iterations=4, rigid_levels=rigid_levels)
    affine_register(fixed, rigid_case[1], config, progress=lambda done, total: calls.append((done, total)))
    total = 5 * 4 + rigid_steps + (5 + 3 + 2)  # 5 start candidates, then rigid and affine stages
    assert calls == [(i, total) for i in range(1, total + 1)]
    assert len(affine_register(fixed, rigid_case[1], config).history) == rigid_steps + 5 + 3 + 2


def test_mask_of_wrong_shape_is_rejected(fixed):
    with pytest.raises(VoxregError, match="mask"):
        affine_register(fixed, fixed, fixed_mask=np.ones((4, 4, 4)))


@pytest.mark.parametrize("value, word", [(0.0, "empty"), (3.0, "constant")])
def test_empty_or_constant_image_names_the_file(fixed, value, word):
    blank = Image(np.full(SHAPE, value, np.float32), fixed.affine, Path("/data/blank_scan.nii.gz"))
    with pytest.raises(VoxregError, match=rf"blank_scan\.nii\.gz: cannot be aligned: image is {word}"):
        affine_register(fixed, blank)
    with pytest.raises(VoxregError, match="blank_scan"):
        affine_register(blank, fixed)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("background", [0.0, None])
def test_a_nan_or_inf_voxel_names_the_file(fixed, bad, background):
    """One NaN or +-Inf voxel in a real scan, or in an otherwise empty one (the NaN/Inf message
    comes first), is refused with the file's name."""
    array = np.array(fixed.array, np.float32) if background is None else np.full(SHAPE, background, np.float32)
    array[3, 4, 5] = bad
    broken = Image(array, fixed.affine, Path("/data/broken_scan.nii.gz"))
    with pytest.raises(VoxregError, match=r"broken_scan\.nii\.gz: cannot be aligned: image holds NaN or Inf voxels"):
        affine_register(fixed, broken)


def test_huge_learning_rate_does_not_leave_the_best_state(fixed, rigid_case):
    """Steps that throw the samples out of the moving image are never kept."""
    result = affine_register(fixed, rigid_case[1], AffineConfig(transform="affine", lr=1e6))
    assert np.all(np.isfinite(result.world_matrix))
    assert result.similarity_after >= result.similarity_before


def test_a_transform_less_similar_than_the_headers_is_not_returned(fixed, monkeypatch):
    """Same scan twice (headers already align it): a start candidate 30 mm off that the
    optimisation (0 steps) cannot bring back is refused in favour of the identity."""
    from voxreg.registration import affine

    original = affine._pick_candidate

    def far_off(problem, config, tick):
        name, state = original(problem, config, tick)
        state.shift = state.shift + 30.0
        return "far off", state

    monkeypatch.setattr(affine, "_pick_candidate", far_off)
    result = affine_register(fixed, fixed, AffineConfig(iterations=(0, 0, 0)))
    np.testing.assert_allclose(result.world_matrix, np.eye(4), atol=1e-12)
    assert result.init == "identity (the optimised transform was less similar)"
    assert result.similarity_after == result.similarity_before


def test_nan_similarity_raises_voxreg_error(fixed, rigid_case, monkeypatch):
    from voxreg.registration import affine

    monkeypatch.setattr(affine, "_sample_ncc", lambda *args, **kwargs: torch.tensor(float("nan")))
    with pytest.raises(VoxregError, match="NaN"):
        affine_register(fixed, rigid_case[1])


def test_sample_ncc_equals_masked_global_ncc_with_its_gradient():
    from voxreg import losses
    from voxreg.registration.affine import _sample_ncc

    torch.manual_seed(0)
    fixed = torch.rand(5000, dtype=torch.float64)
    moving = (0.4 * fixed + torch.rand(5000, dtype=torch.float64)).requires_grad_(True)
    weights = (torch.rand(5000) > 0.3).double()
    shape = (1, 1, 5000, 1)
    fast = _sample_ncc(fixed, moving, weights)
    (fast_grad,) = torch.autograd.grad(fast, moving)
    reference = losses.global_ncc(fixed.view(shape), moving.view(shape), mask=weights.view(shape))
    (reference_grad,) = torch.autograd.grad(reference, moving)
    # equal up to where the 1e-8 guard sits (global_ncc adds it to standardised variances)
    torch.testing.assert_close(fast, reference, rtol=2e-6, atol=0.0)
    torch.testing.assert_close(fast_grad, reference_grad, rtol=0.0, atol=2e-5 * float(reference_grad.abs().max()))
    assert float(_sample_ncc(fixed, -2.0 * fixed + 3.0, weights)) == pytest.approx(-1.0)
    assert float(_sample_ncc(fixed, torch.full_like(fixed, 7.0), weights)) == 0.0  # constant: 0


def test_mattes_mi_properties():
    torch.manual_seed(0)
    a = torch.rand(4000, dtype=torch.float64)
    b = torch.rand(4000, dtype=torch.float64)
    assert float(mattes_mi(a, a, bins=16)) > 1.5  # log(16) = 2.8 less the B-spline Parzen blur
    assert float(mattes_mi(a, b, bins=16)) < 0.1
    assert abs(float(mattes_mi(a, 1.0 - a, bins=16)) - float(mattes_mi(a, a, bins=16))) < 0.05
    x = torch.rand(60, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: mattes_mi(a[:60], m, None, 8), (x,))


def test_pyramids_use_the_callers_threads_and_the_optimiser_one(monkeypatch):
    """The pyramids and samples are prepared on the caller's torch threads (whole-image work),
    the optimiser runs on ``config.threads`` (1), the caller's setting is back afterwards, and
    the transform is the same as with everything on one thread."""
    from voxreg.registration import affine

    fixed = phantom(seed=1)
    moving = Image(np.roll(fixed.array, 2, axis=0), fixed.affine)
    seen: dict[str, list[int]] = {"prepare": [], "optimise": []}
    for name in seen:
        original = getattr(affine, f"_{name}")

        def spy(*args, _original=original, _name=name, **kwargs):
            seen[_name].append(torch.get_num_threads())
            return _original(*args, **kwargs)

        monkeypatch.setattr(affine, f"_{name}", spy)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = affine_register(fixed, moving)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        one = affine_register(fixed, moving)
    finally:
        torch.set_num_threads(previous)
    assert seen["prepare"] == [2, 1] and set(seen["optimise"]) == {1}
    np.testing.assert_allclose(two.world_matrix, one.world_matrix, atol=1e-5)
    assert abs(two.world_matrix[0, 3] - one.world_matrix[0, 3]) < 1e-4 and not np.allclose(two.world_matrix, np.eye(4))
