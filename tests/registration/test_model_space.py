"""registration.model_space: model grids and field mapping through world millimetres."""

import numpy as np
import pytest
import torch

from voxreg.core.grid import Grid
from voxreg.registration.model_space import ModelSpace, field_to_fixed, model_grid


def _affine(spacing, rotation_deg=0.0, origin=(10.0, -20.0, 5.0)):
    t = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def test_model_grid_shape_centre_and_voxel_size():
    fixed = Grid((64, 64, 64), _affine((1.0, 1.0, 1.0)))
    grid = model_grid(fixed, ModelSpace(voxel_size=(2.0, 2.0, 2.0), multiple=16, margin_mm=8.0))
    # extent 63 mm + 2 * 8 mm = 79 mm -> 39.5 voxels of 2 mm -> 48 (multiple of 16)
    assert grid.shape == (48, 48, 48)
    np.testing.assert_allclose(grid.spacing, [2.0, 2.0, 2.0])
    centre_fixed = fixed.voxel_to_world(np.array([[31.5, 31.5, 31.5]]))
    centre_model = grid.voxel_to_world(np.array([[23.5, 23.5, 23.5]]))
    np.testing.assert_allclose(centre_model, centre_fixed, atol=1e-9)


def test_model_grid_follows_the_foreground_box():
    fixed = Grid((100, 80, 60), _affine((1.0, 1.0, 1.0)))
    mask = np.zeros(fixed.shape, bool)
    mask[10:30, 20:40, 5:25] = True  # 20 voxels per axis: 19 mm + 16 mm margin -> 35 mm -> 16 vox at 2.5 mm
    grid = model_grid(fixed, ModelSpace(voxel_size=(2.5,) * 3, multiple=16), foreground=mask)
    assert grid.shape == (16, 16, 16)
    centre = grid.voxel_to_world(np.array([[7.5, 7.5, 7.5]]))
    np.testing.assert_allclose(centre, fixed.voxel_to_world(np.array([[19.5, 29.5, 14.5]])), atol=1e-9)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (1.0, 1.0, 3.0)])
@pytest.mark.parametrize("rotation", [0.0, 30.0])
def test_known_shift_in_mm_is_kept_at_any_voxel_size(spacing, rotation):
    """A constant model-space shift of (3, -2, 4.5) mm along the scan axes is the same shift
    in mm on the fixed grid, whatever its voxel size and orientation."""
    fixed = Grid((40, 36, 20), _affine(spacing, rotation))
    space = ModelSpace(voxel_size=(2.0, 2.0, 2.0), multiple=8)
    grid = model_grid(fixed, space)
    shift_mm = np.array([3.0, -2.0, 4.5])
    field = torch.tensor(shift_mm / 2.0, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *grid.shape)
    out = field_to_fixed(field.contiguous(), grid, fixed)
    assert out.shape == (1, 3, *fixed.shape)
    np.testing.assert_allclose(out[0, :, 5, 5, 5].numpy(), shift_mm / np.asarray(spacing), rtol=1e-5)
    world = fixed.affine[:3, :3] @ out[0, :, 20, 18, 10].numpy().astype(float)
    model_world = grid.affine[:3, :3] @ (shift_mm / 2.0)
    np.testing.assert_allclose(world, model_world, atol=1e-4)


def test_two_d_and_validation():
    fixed = Grid((30, 40), np.diag([0.5, 0.5, 1.0, 1.0]))
    grid = model_grid(fixed, ModelSpace(voxel_size=(1.0, 1.0), ndim=2, multiple=8, margin_mm=0.0))
    assert grid.shape == (16, 24)  # 14.5 mm -> 15 vox -> 16; 19.5 mm -> 20 -> 24
    field = torch.zeros(1, 2, *grid.shape)
    field[:, 0] = 1.0  # 1 mm along axis 0 -> 2 fixed voxels of 0.5 mm
    np.testing.assert_allclose(field_to_fixed(field, grid, fixed)[0, 0, 15, 20].item(), 2.0, rtol=1e-5)
    with pytest.raises(ValueError, match="voxel_size must be finite and > 0"):
        ModelSpace(voxel_size=(float("nan"),) * 3)
    with pytest.raises(ValueError, match="3D scans; this scan is 2D"):
        model_grid(fixed, ModelSpace(voxel_size=(2.0,) * 3))
    assert ModelSpace.from_dict(ModelSpace(voxel_size=(2.0, 2.0, 3.0)).to_dict()).voxel_size == (2.0, 2.0, 3.0)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 3.0)])
def test_axis_aligned_mapping_equals_the_general_resampling(spacing):
    # model_grid builds grids along the fixed axes, so field_to_fixed samples per axis; the
    # result equals sampling the model field at every fixed voxel's model coordinates
    from voxreg.core import spatial
    from voxreg.registration.model_space import _fixed_in_model_coords, _linear

    fixed = Grid((37, 30, 14), _affine(spacing, 20.0))
    mask = np.zeros(fixed.shape, bool)
    mask[5:30, 4:20, 2:12] = True  # the model grid covers part of the scan: zero outside it
    grid = model_grid(fixed, ModelSpace(voxel_size=(2.0, 2.0, 2.0), multiple=8, margin_mm=2.0), foreground=mask)
    torch.manual_seed(0)
    field = torch.randn(1, 3, *grid.shape)
    sampled = spatial.sample(field, _fixed_in_model_coords(grid, fixed, field.device), "linear", padding="zeros")
    matrix = torch.as_tensor(np.linalg.inv(_linear(fixed)) @ _linear(grid), dtype=torch.float32)
    expected = (matrix @ sampled.reshape(3, -1)).reshape(1, 3, *fixed.shape)
    torch.testing.assert_close(field_to_fixed(field, grid, fixed), expected, atol=1e-4, rtol=1e-4)
    assert float(expected.abs().amax()) > 1.0 and float(expected[0, :, 0, 0, 0].abs().max()) < 1e-5


def test_foreground_bounds_are_the_first_and_last_slice_holding_a_voxel_per_axis():
    from voxreg.registration.model_space import _foreground_bounds

    mask = np.zeros((9, 10, 11), bool)
    mask[2, 7, 3] = mask[5, 1, 9] = mask[6, 4, 4] = True
    low, high = _foreground_bounds(mask, mask.shape)
    assert low.tolist() == [2, 1, 3] and high.tolist() == [6, 7, 9]
    low, high = _foreground_bounds(np.zeros((4, 5), bool), (4, 5))  # empty: the whole grid
    assert low.tolist() == [0, 0] and high.tolist() == [3, 4]
