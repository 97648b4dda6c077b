"""core.grid: voxel <-> world maths with answers computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from voxreg.core.grid import (
    Grid,
    apply_matrix,
    embed_world,
    level_grid,
    mapped_coords,
    reduced_affine,
    voxel_indices,
    voxel_matrix,
    voxel_spacing,
    world_points,
)
from voxreg.core.image import Image

C30, S30 = math.cos(math.pi / 6), math.sin(math.pi / 6)  # sqrt(3)/2, 1/2


def oblique(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Rotation of 30 degrees about z, times diag(spacing), plus origin."""
    affine = np.eye(4)
    affine[:3, :3] = np.array([[C30, -S30, 0], [S30, C30, 0], [0, 0, 1]]) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def test_oblique_voxel_to_world_by_hand():
    grid = Grid((4, 4, 4), oblique(origin=(10.0, -5.0, 2.0)))
    # voxel (1, 0, 0) goes one mm along the rotated x axis: (cos 30, sin 30, 0) from the origin
    np.testing.assert_allclose(grid.voxel_to_world([[1, 0, 0]]), [[10 + C30, -5 + S30, 2]], atol=1e-12)
    # voxel (0, 2, 1): 2 mm along (-sin 30, cos 30, 0) and 1 mm along z
    np.testing.assert_allclose(grid.voxel_to_world([[0, 2, 1]]), [[10 - 1.0, -5 + 2 * C30, 3]], atol=1e-12)


def test_flipped_axes_lps_like():
    grid = Grid((5, 5, 5), np.diag([-1.0, -1.0, 1.0, 1.0]))
    np.testing.assert_allclose(grid.voxel_to_world([[2, 3, 4]]), [[-2, -3, 4]])
    np.testing.assert_allclose(grid.world_to_voxel([[-2, -3, 4]]), [[2, 3, 4]])
    np.testing.assert_allclose(grid.spacing, [1, 1, 1])


def test_anisotropic_1x1x3():
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    grid = Grid((4, 4, 5), affine)
    np.testing.assert_allclose(grid.spacing, [1, 1, 3])
    np.testing.assert_allclose(grid.voxel_to_world([[1, 2, 3]]), [[1, 2, 9]])
    np.testing.assert_allclose(Image(np.zeros((4, 4, 5), np.float32), affine).spacing, [1, 1, 3])


def test_2d_grid_uses_the_xy_plane():
    affine = np.diag([2.0, 0.5, 7.0, 1.0])
    affine[:3, 3] = (1.0, 2.0, 3.0)
    grid = Grid((6, 8), affine)
    assert grid.ndim == 2
    np.testing.assert_allclose(grid.spacing, [2.0, 0.5])
    np.testing.assert_allclose(grid.reduced, [[2, 0, 1], [0, 0.5, 2], [0, 0, 1]])
    np.testing.assert_allclose(grid.voxel_to_world([[1, 2]]), [[3, 3, 3]])
    np.testing.assert_allclose(grid.world_to_voxel([[3, 3, 3]]), [[1, 2]])
    np.testing.assert_allclose(embed_world(reduced_affine(affine, 2), 2)[:2], affine[:2] * [1, 1, 0, 1])


@pytest.mark.parametrize(
    "affine",
    [oblique((1.0, 1.0, 3.0), (4.0, -3.0, 2.0)), np.diag([-1.0, -1.0, 1.0, 1.0]), np.diag([1.0, 1.0, 3.0, 1.0])],
)
def test_voxel_world_round_trip(affine):
    grid = Grid((7, 6, 5), affine)
    points = np.random.default_rng(0).uniform(-3, 9, (20, 3))
    np.testing.assert_allclose(grid.world_to_voxel(grid.voxel_to_world(points)), points, atol=1e-10)


def test_voxel_spacing_of_oblique_anisotropic_affine():
    affine = oblique((0.8, 1.2, 3.0), (5.0, 6.0, 7.0))
    np.testing.assert_allclose(voxel_spacing(affine), [0.8, 1.2, 3.0], atol=1e-12)
    np.testing.assert_allclose(voxel_spacing(affine, 2), [0.8, 1.2], atol=1e-12)
    np.testing.assert_allclose(voxel_spacing(reduced_affine(affine, 2)), [0.8, 1.2], atol=1e-12)


def test_voxel_matrix_1mm_to_2mm_with_offset():
    fixed = np.eye(4)  # 1 mm, origin 0
    moving = np.diag([2.0, 2.0, 2.0, 1.0])
    moving[:3, 3] = (10.0, -4.0, 6.0)  # 2 mm, origin (10, -4, 6)
    # moving index = (fixed index - origin) / 2
    expected = np.array([[0.5, 0, 0, -5.0], [0, 0.5, 0, 2.0], [0, 0, 0.5, -3.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(voxel_matrix(fixed, moving, 3), expected)
    np.testing.assert_allclose(Grid((4, 4, 4), fixed).voxel_matrix_to(Grid((2, 2, 2), moving)), expected)
    # with a world translation of +2 mm along x, the moving index grows by 1 along axis 0
    shift = np.eye(4)
    shift[0, 3] = 2.0
    np.testing.assert_allclose(voxel_matrix(fixed, moving, 3, shift)[0, 3], -4.0)
    np.testing.assert_allclose(voxel_matrix(fixed, moving, 2), expected[np.ix_([0, 1, 3], [0, 1, 3])])


def test_apply_matrix_and_world_points():
    matrix = np.array([[2.0, 0, 1], [0, 3.0, -1], [0, 0, 1]])
    np.testing.assert_allclose(apply_matrix(matrix, [[1, 1], [0, 2]]), [[3, 2], [1, 5]])
    np.testing.assert_allclose(voxel_indices((2, 3))[:, 4], [1, 1])
    np.testing.assert_allclose(world_points(matrix, (2, 3))[:, 5], [3, 5])


def test_mapped_coords_matches_numpy():
    matrix = voxel_matrix(oblique((1.0, 1.0, 3.0), (1.0, 2.0, 3.0)), oblique((2.0, 1.5, 1.0)), 3)
    shape = (5, 4, 3)
    coords = mapped_coords(matrix, shape)
    assert coords.shape == (1, 3, *shape) and coords.dtype == torch.float32
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    homogeneous = np.stack([i, j, k, np.ones_like(i)]).reshape(4, -1).astype(np.float64)
    expected = (matrix @ homogeneous)[:3].reshape(3, *shape)
    np.testing.assert_allclose(coords[0].numpy(), expected, atol=1e-5)


def test_level_grid_covers_the_extent():
    affine, shape = level_grid(np.eye(4), (8, 8, 8), 2.0)
    assert shape == (4, 4, 4)
    # level voxel 0 is the centre of image voxels 0..1, at 0.5 mm; spacing 2 mm
    np.testing.assert_allclose(affine, [[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1]])


def test_image_kind_and_grid():
    labels = Image(np.zeros((3, 3, 3), np.int16))
    scan = Image(np.zeros((3, 3, 3), np.float32))
    assert labels.kind == "label" and labels.is_label
    assert scan.kind == "intensity" and not scan.is_label
    assert Image(np.zeros((2, 2), np.float32), kind="label").is_label
    assert scan.grid.shape == (3, 3, 3) and scan.grid.ndim == 3
    np.testing.assert_array_equal(scan.grid.affine, np.eye(4))
    with pytest.raises(ValueError, match="kind"):
        Image(np.zeros((2, 2), np.float32), kind="mask")
