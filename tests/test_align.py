"""Instance optimisation: known displacements are recovered, foreground cropping and
refinement on top of an initial field behave as documented."""

from __future__ import annotations

import pytest
import torch

from conftest import smooth_volume
from voxreg.core import spatial
from voxreg.registration.instance import AlignConfig, _field_from_parameter, align, foreground_box

FAST = dict(similarity="mse", scales=(2, 1), iterations=(60, 30), lr=0.1)


def shifted_pair(shape, axis, shift, seed=0):
    fixed = torch.from_numpy(smooth_volume(shape, seed=seed))[None, None]
    field = torch.zeros(1, len(shape), *shape)
    field[:, axis] = -shift
    return fixed, spatial.warp(fixed, field)  # moving(x) = fixed(x - shift e_axis)


@pytest.mark.parametrize("shape,axis", [((40, 44), 1), ((24, 28, 22), 0), ((24, 28, 22), 2)])
def test_recovers_a_known_shift(shape, axis):
    fixed, moving = shifted_pair(shape, axis, 1.5)
    result = align(fixed, moving, AlignConfig(**FAST))
    interior = (0, axis) + tuple(slice(6, -6) for _ in shape)
    assert abs(float(result.field[interior].median()) - 1.5) < 0.2
    before = torch.mean((moving - fixed) ** 2)
    after = torch.mean((spatial.warp(moving, result.field) - fixed) ** 2)
    assert after < 0.1 * before
    assert result.history[-1] < result.history[0]


def test_foreground_box_and_full_grid_field():
    fixed = torch.zeros(1, 1, 30, 32, 34)
    fixed[:, :, 10:20, 12:18, 5:25] = 1.0
    moving = torch.zeros_like(fixed)
    moving[:, :, 12:22, 12:18, 5:25] = 1.0
    assert foreground_box(fixed, moving, margin=2, block=1) == (slice(8, 24), slice(10, 20), slice(3, 27))
    # blocks of 4 voxels: the union 10:22 x 12:18 x 5:25 rounds out to 8:24 x 12:20 x 4:28
    assert foreground_box(fixed, moving, margin=0, block=4) == (slice(8, 24), slice(12, 20), slice(4, 28))
    spiky = moving.clone()
    spiky[0, 0, 1, 1, 1] = 0.1  # one noise spike in the background does not widen the box
    assert foreground_box(fixed, spiky, margin=0, block=4) == (slice(8, 24), slice(12, 20), slice(4, 28))
    result = align(fixed, moving, AlignConfig(**FAST))
    assert result.field.shape == (1, 3, 30, 32, 34)
    assert torch.isfinite(result.field).all()


def test_refinement_composes_with_the_initial_field():
    fixed, moving = shifted_pair((24, 28, 22), 1, 2.0, seed=2)
    initial = torch.zeros(1, 3, 24, 28, 22)
    initial[:, 1] = 1.0  # half of the answer, as a network might give
    result = align(fixed, moving, AlignConfig(**{**FAST, "iterations": (30, 15)}), initial_field=initial)
    interior = (0, 1, slice(6, -6), slice(6, -6), slice(6, -6))
    assert abs(float(result.field[interior].median()) - 2.0) < 0.25


def test_identical_images_give_a_near_zero_field():
    # linear interpolation makes the loss kink at integer positions, so the optimiser
    # jitters around the optimum by a fraction of its step: bound that jitter
    generator = torch.Generator().manual_seed(0)
    fixed = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 28, 28, 28, generator=generator), 3, 1, 1)
    result = align(fixed, fixed.clone(), AlignConfig(similarity="ncc", scales=(2, 1), iterations=(20, 10)))
    assert result.field.abs().mean() < 0.1
    assert result.field.abs().max() < 1.0


def test_config_validation():
    with pytest.raises(ValueError, match="similarity"):
        AlignConfig(similarity="cosine")
    with pytest.raises(ValueError, match="same length"):
        AlignConfig(scales=(4, 2), iterations=(10,))
    assert AlignConfig(similarity="MI").lam == 2.0  # per-similarity default weight
    with pytest.raises(ValueError, match="residual_int_steps must be >= 0"):
        AlignConfig(residual_int_steps=-1)


def test_the_finest_level_composes_a_residual_after_the_coarse_field():
    config = AlignConfig(residual_int_steps=2)
    base = torch.zeros(1, 3, 6, 7, 8)
    base[:, 0] = 1.5  # a translation by 1.5 voxels of the parameter grid
    zero = torch.zeros_like(base)
    # a zero residual leaves the coarse field (resized to the level: values x (new-1)/(old-1))
    torch.testing.assert_close(
        _field_from_parameter(zero, (11, 7, 8), config, base)[:, 0], torch.full((1, 11, 7, 8), 3.0)
    )
    # translations compose by adding: 1.5 + 0.5 voxel; the residual velocity of a translation
    # integrates to itself whatever the number of squarings
    residual = torch.zeros_like(base)
    residual[:, 0] = 0.5
    torch.testing.assert_close(
        _field_from_parameter(residual, (6, 7, 8), config, base)[:, 0], torch.full((1, 6, 7, 8), 2.0)
    )
    # without a base the parameter is the whole velocity, integrated with int_steps
    torch.testing.assert_close(_field_from_parameter(residual, (6, 7, 8), config)[:, 0], torch.full((1, 6, 7, 8), 0.5))


@pytest.mark.parametrize("fine_residual", [True, False])
def test_known_shift_with_and_without_the_fine_residual(fine_residual):
    fixed, moving = shifted_pair((24, 28, 22), 0, 1.5)
    result = align(fixed, moving, AlignConfig(**FAST, fine_residual=fine_residual))
    interior = (0, 0, slice(6, -6), slice(6, -6), slice(6, -6))
    assert abs(float(result.field[interior].median()) - 1.5) < 0.2
