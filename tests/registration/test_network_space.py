"""registration.network: predictions in the model's space map back to the same world shift
whatever the scan's voxel size (1 mm, 2 mm, 1x1x3 mm)."""

import numpy as np
import pytest
import torch
from tests.conftest import CentroidShift, gaussian_blob

from voxreg.core.image import Image
from voxreg.registration.model_space import ModelSpace
from voxreg.registration.network import model_space_of, predict_fields


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (1.0, 1.0, 3.0)])
def test_known_shift_in_mm_recovered_at_any_voxel_size(spacing):
    shift_mm = np.array([6.0, -4.0, 3.0])
    fixed = gaussian_blob(spacing, (48.0, 48.0, 48.0))
    moving = gaussian_blob(spacing, tuple(48.0 + shift_mm))  # moving(x + shift) == fixed(x)
    space = ModelSpace(voxel_size=(2.0, 2.0, 2.0), multiple=8)
    field = predict_fields(CentroidShift(), space, fixed, moving, None, torch.device("cpu"))[0]
    assert field.shape == (1, 3, *fixed.shape)
    centre = tuple(s // 2 for s in fixed.shape)
    got_mm = field[0, :, centre[0], centre[1], centre[2]].numpy() * np.asarray(spacing)
    np.testing.assert_allclose(got_mm, shift_mm, atol=0.35)


def test_checkpoint_without_space_predicts_on_the_fixed_grid():
    fixed = gaussian_blob((2.0, 2.0, 2.0), (48.0, 48.0, 48.0))
    moving = gaussian_blob((2.0, 2.0, 2.0), (52.0, 48.0, 48.0))
    field = predict_fields(CentroidShift(), None, fixed, moving, None, torch.device("cpu"))[0]
    np.testing.assert_allclose(field[0, :, 24, 24, 24].numpy(), [2.0, 0.0, 0.0], atol=0.05)
    assert model_space_of({}) is None
    assert model_space_of({"model_space": {"voxel_size": [2, 2, 2], "ndim": 3}}).voxel_size == (2.0, 2.0, 2.0)


@pytest.mark.parametrize("space", [ModelSpace(voxel_size=(2.0, 2.0, 2.0), multiple=8), None])
def test_moving_scan_through_a_world_matrix_gives_the_field_of_the_resampled_scan(space):
    # the network resamples the moving scan once, from its own grid (here 1.5 mm, shifted
    # by 9 mm) to the model grid through the affine stage's world matrix; the result matches
    # resampling it onto the fixed grid first
    from voxreg import io

    fixed = gaussian_blob((1.0, 1.0, 1.0), (48.0, 48.0, 48.0))
    moving = gaussian_blob((1.5, 1.5, 1.5), (48.0 + 6.0, 48.0, 48.0 - 9.0))
    world_matrix = np.eye(4)
    world_matrix[2, 3] = -9.0  # fixed world -> moving world: the moving blob sits 9 mm lower
    direct = predict_fields(
        CentroidShift(), space, fixed, moving, None, torch.device("cpu"), world_matrix=world_matrix
    )[0]
    on_fixed = io.resample_to(moving, fixed, world_matrix)
    expected = predict_fields(CentroidShift(), space, fixed, on_fixed, None, torch.device("cpu"))[0]
    centre = tuple(s // 2 for s in fixed.shape)
    got, want = direct[0, :, centre[0], centre[1], centre[2]], expected[0, :, centre[0], centre[1], centre[2]]
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=0.15)
    np.testing.assert_allclose(got.numpy(), [6.0, 0.0, 0.0], atol=0.35)  # the remaining 6 mm along x


@pytest.mark.parametrize("rotate", [False, True])
def test_smoothing_only_the_reachable_part_gives_the_values_of_smoothing_it_all(rotate, monkeypatch):
    from scipy.spatial.transform import Rotation

    from voxreg.core.grid import Grid
    from voxreg.registration import network

    rng = np.random.default_rng(4)
    image = Image(rng.random((60, 52, 40)).astype(np.float32), np.diag([1.0, 1.2, 1.5, 1.0]))
    affine = np.diag([2.1, 2.1, 2.1, 1.0])
    affine[:3, 3] = [12.0, 15.0, 9.0]
    grid = Grid((16, 14, 12), affine)  # well inside the image: the crop is a small part of it
    world = None
    if rotate:
        world = np.eye(4)
        world[:3, :3] = Rotation.from_euler("xyz", [9, -6, 14], degrees=True).as_matrix()
        world[:3, 3] = [3.0, -2.0, 4.0]
    part = network._reachable_part(image, grid, world, margin=5)
    assert part.array.size < 0.6 * image.array.size
    cropped = network.to_model_grid(image, grid, world)
    monkeypatch.setattr(network, "_reachable_part", lambda image, *args, **kwargs: image)
    np.testing.assert_allclose(cropped, network.to_model_grid(image, grid, world), rtol=1e-5, atol=1e-6)
    assert abs(float(cropped.mean()) - 0.5) < 0.05  # smoothed noise keeps its mean
