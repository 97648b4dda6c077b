"""Instance optimisation: known displacements are recovered, foreground cropping and
refinement on top of an initial field behave as documented."""

from __future__ import annotations

import pytest
import torch

from conftest import smooth_volume
from voxreg.core import spatial
from voxreg.registration.instance import (
    AlignConfig,
    _active_voxels,
    _field_from_parameter,
    _next_level,
    _warp_level,
    align,
    capped_scales,
    foreground_box,
)

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


def test_capped_scales_double_until_the_finest_level_fits():
    assert capped_scales((4, 2, 1), (512, 512, 300), 32_000_000) == (8, 4, 2)  # 78.6 M -> 9.8 M voxels
    assert capped_scales((4, 2, 1), (256, 256, 160), 32_000_000) == (4, 2, 1)  # a 1 mm brain keeps its level
    assert capped_scales((2, 1), (100, 100, 100), 1000) == (32, 16)  # 12^3 = 1728 > 1000; 8^3 (the floor) fits
    assert capped_scales((4, 2, 1), (512, 512, 300), 0) == (4, 2, 1)  # no limit
    assert capped_scales((2, 1), (8, 8), 10) == (2, 1)  # nothing can shrink: unchanged


def test_a_large_image_is_optimised_on_coarser_levels_and_its_field_covers_the_grid():
    """Over ``max_level_voxels`` the pyramid is coarser (and says so) but the field is still
    on the full grid and still recovers the shift."""
    fixed, moving = shifted_pair((24, 28, 22), 0, 1.5)
    result = align(fixed, moving, AlignConfig(**FAST, max_level_voxels=24 * 28 * 22 // 4))
    assert result.scales == (4, 2)
    assert result.field.shape == (1, 3, 24, 28, 22)
    assert abs(float(result.field[0, 0, 6:-6, 6:-6, 6:-6].median()) - 1.5) < 0.25
    assert align(fixed, moving, AlignConfig(**FAST)).scales == (2, 1)


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
    with pytest.raises(ValueError, match="residual_levels must be >= 0"):
        AlignConfig(residual_levels=-1)


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


@pytest.mark.parametrize("residual_levels", [0, 1, 2])
def test_known_shift_whatever_the_levels_optimising_a_residual(residual_levels):
    fixed, moving = shifted_pair((24, 28, 22), 0, 1.5)
    config = dict(FAST, scales=(4, 2, 1), iterations=(40, 30, 20))
    result = align(fixed, moving, AlignConfig(**config, residual_levels=residual_levels))
    interior = (0, 0, slice(6, -6), slice(6, -6), slice(6, -6))
    assert abs(float(result.field[interior].median()) - 1.5) < 0.2


def test_next_level_starts_a_residual_after_the_field_so_far_or_continues_the_velocity():
    velocity = torch.zeros(1, 3, 4, 5, 6)
    velocity[:, 1] = 0.75  # a translation: integrates to itself
    config = AlignConfig(scales=(4, 2, 1), iterations=(1, 1, 1), residual_levels=1)
    param, base = _next_level(velocity, None, config, 1, [7, 9, 11])  # level 1 of 3: velocity
    assert base is None
    torch.testing.assert_close(param[:, 1], torch.full((1, 7, 9, 11), 0.75 * 8 / 4))  # resized: x (9-1)/(5-1)
    param, base = _next_level(velocity, None, config, 2, [7, 9, 11])  # the finest: a residual
    assert float(param.abs().max()) == 0.0
    torch.testing.assert_close(base[:, 1], torch.full((1, 7, 9, 11), 1.5))
    # with two residual levels the middle one starts from zero too, and the finest composes
    # the middle level's residual after its base: 1.5 + 0.25 voxel of the middle grid
    config = AlignConfig(scales=(4, 2, 1), iterations=(1, 1, 1), residual_levels=2)
    _, base = _next_level(velocity, None, config, 1, [7, 9, 11])
    residual = torch.zeros(1, 3, 7, 9, 11)
    residual[:, 1] = 0.25
    param, base = _next_level(residual, base, config, 2, [13, 17, 21])
    torch.testing.assert_close(base[:, 1], torch.full((1, 13, 17, 21), (1.5 + 0.25) * 16 / 8))


def test_active_voxels_cover_the_grown_foreground_and_the_sparse_warp_matches_the_dense_one():
    fixed = torch.zeros(1, 1, 40, 36, 30)
    fixed[:, :, 15:25, 12:22, 10:18] = torch.rand(1, 1, 10, 10, 8) * 0.5 + 0.5
    moving = torch.roll(fixed, 2, dims=2)
    config = AlignConfig()  # window 5 -> radius 2, plus the margin of 4 voxels
    active = _active_voxels(fixed, moving, torch.zeros(1, 3, 40, 36, 30), config)
    mask = torch.zeros(40 * 36 * 30, dtype=torch.bool)
    mask[active] = True
    mask = mask.view(40, 36, 30)
    # foreground of either image (x 15..26, y 12..21, z 10..17) grown by 6 voxels, nothing else
    expected = torch.zeros(40, 36, 30, dtype=torch.bool)
    expected[15 - 6 : 27 + 6, 12 - 6 : 22 + 6, 10 - 6 : 18 + 6] = True
    assert torch.equal(mask, expected)
    field = torch.randn(1, 3, 40, 36, 30) * 0.7
    field.requires_grad_(True)
    sparse = _warp_level(moving, field, active)
    dense = spatial.warp(moving, field)
    torch.testing.assert_close(sparse.view(-1)[active], dense.view(-1)[active])
    assert float(sparse.detach().view(-1)[~mask.view(-1)].abs().max()) == 0.0
    # the gradient reaches the field at the active voxels only, equal to the dense warp's there
    (grad_sparse,) = torch.autograd.grad((sparse * dense.detach()).sum(), field)
    (grad_dense,) = torch.autograd.grad((dense * mask * dense.detach()).sum(), field)
    torch.testing.assert_close(grad_sparse, grad_dense)
    # a grid mostly foreground, or no foreground threshold: warp every voxel
    zero = torch.zeros(1, 3, 20, 20, 20)
    assert _active_voxels(torch.ones(1, 1, 20, 20, 20), moving[..., :20, :20, :20], zero, config) is None
    assert _active_voxels(fixed, moving, torch.zeros(1, 3, 40, 36, 30), AlignConfig(foreground_threshold=0.0)) is None
    blank = torch.zeros(1, 1, 20, 20, 20)
    assert _active_voxels(blank, blank, zero, config) is None
    assert torch.isfinite(align(blank, blank, AlignConfig(**FAST)).field).all()


def test_thread_chooser_probes_until_all_threads_win(monkeypatch):
    from voxreg.registration import instance

    readings = [0.0, 1.0, 0.0, 2.0]  # level 1: step 1 (2 threads) 1 s, step 2 (1 thread) 2 s
    calls = []
    monkeypatch.setattr(instance.time, "perf_counter", lambda: calls.append(1) or readings[len(calls) - 1])
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        chooser = instance._ThreadChooser(AlignConfig(), torch.device("cpu"))
        threads_per_step = []
        for _level in range(2):
            chooser.start_level(10)
            for step in range(4):
                chooser.before(step)
                threads_per_step.append(torch.get_num_threads())
                chooser.after(step)
        assert threads_per_step == [2, 2, 1, 2, 2, 2, 2, 2]  # probed on level 1 only
        assert chooser.all_won and len(calls) == 4
    finally:
        torch.set_num_threads(previous)
