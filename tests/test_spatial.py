"""Spatial transforms: hand-computable answers, 2D and 3D through one code path."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from voxreg.core import spatial

SHAPES = [(7, 8, 9), (9, 11)]


def ramp_image(shape):
    """An image whose value encodes the voxel index uniquely."""
    n = int(torch.tensor(shape).prod())
    return torch.arange(n, dtype=torch.float32).reshape(1, 1, *shape)


def smooth_field(shape, amplitude, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ndim = len(shape)
    coarse = torch.randn(1, ndim, *[4] * ndim, generator=gen)
    noise = spatial.resize_image(coarse, shape)  # smooth: linear over a 4-point lattice
    pool = F.avg_pool3d if ndim == 3 else F.avg_pool2d
    noise = pool(noise, 5, 1, 2, count_include_pad=False)
    return noise / noise.abs().max() * amplitude


@pytest.mark.parametrize("shape", SHAPES)
def test_one_voxel_shift_moves_image_one_voxel_along_each_axis(shape):
    ndim = len(shape)
    image = ramp_image(shape)
    for axis in range(ndim):
        field = torch.zeros(1, ndim, *shape)
        field[:, axis] = 1.0
        warped = spatial.warp(image, field)
        # warped(x) = image(x + e_axis): warped[..., i, ...] == image[..., i+1, ...]
        assert torch.allclose(
            warped.narrow(2 + axis, 0, shape[axis] - 1), image.narrow(2 + axis, 1, shape[axis] - 1), atol=1e-3
        )
        # border padding repeats the last slice
        assert torch.allclose(
            warped.narrow(2 + axis, shape[axis] - 1, 1), image.narrow(2 + axis, shape[axis] - 1, 1), atol=1e-3
        )


@pytest.mark.parametrize("shape", SHAPES)
def test_half_voxel_shift_interpolates_linearly(shape):
    ndim = len(shape)
    image = ramp_image(shape)
    field = torch.zeros(1, ndim, *shape)
    field[:, 0] = 0.5
    step = int(torch.tensor(shape[1:]).prod())  # index stride along axis 0
    warped = spatial.warp(image, field)
    interior = warped.narrow(2, 0, shape[0] - 1)
    assert torch.allclose(interior, image.narrow(2, 0, shape[0] - 1) + 0.5 * step)


def test_nearest_keeps_label_values_and_dtype():
    labels = torch.randint(0, 5, (1, 1, 6, 7, 8), dtype=torch.int32)
    field = torch.full((1, 3, 6, 7, 8), 0.3)
    warped = spatial.warp(labels, field, mode="nearest")
    assert warped.dtype == torch.int32
    assert torch.equal(warped, labels)  # 0.3 voxel rounds back to the same voxel


@pytest.mark.parametrize("shape", SHAPES)
def test_linear_field_has_constant_jacobian(shape):
    ndim = len(shape)
    grid = spatial.identity_grid(shape)
    field = torch.zeros(1, ndim, *shape)
    field[:, 0] = 0.2 * grid[:, 0] + 0.1 * grid[:, 1]
    field[:, 1] = -0.3 * grid[:, 1]
    # J = I + [[0.2, 0.1], [0, -0.3]] -> det = 1.2 * 0.7 = 0.84 (3D: third row identity)
    det = spatial.jacobian_determinant(field)
    assert det.shape == (1, *shape)
    assert torch.allclose(det, torch.full_like(det, 0.84), atol=1e-5)


def test_jacobian_detects_folding():
    shape = (10, 10)
    grid = spatial.identity_grid(shape)
    field = torch.zeros(1, 2, *shape)
    field[:, 0] = -2.0 * grid[:, 0]  # x -> -x: det = -1
    assert torch.allclose(spatial.jacobian_determinant(field), torch.full((1, *shape), -1.0))


@pytest.mark.parametrize("shape", [(24, 26, 22), (40, 36)])
def test_compose_with_numerical_inverse_is_identity(shape):
    field = smooth_field(shape, amplitude=1.5)
    inverse = spatial.invert_field(field)
    interior = (slice(None), slice(None)) + tuple(slice(4, -4) for _ in shape)
    # the fixed point v = -u(x + v) makes this direction exact up to float error
    assert spatial.compose(field, inverse)[interior].abs().max() < 1e-4
    # the other direction carries linear-interpolation error only
    residual = spatial.compose(inverse, field)[interior].abs()
    assert residual.max() < 0.05 and residual.mean() < 0.005


def test_compose_matches_sequential_warps():
    shape = (20, 22, 18)
    grid = spatial.identity_grid(shape)
    image = torch.sin(grid[:, :1] / 3) * torch.cos(grid[:, 1:2] / 4) + grid[:, 2:] / 10
    outer, inner = smooth_field(shape, 1.5, seed=1), smooth_field(shape, 1.5, seed=2)
    sequential = spatial.warp(spatial.warp(image, outer), inner)
    direct = spatial.warp(image, spatial.compose(outer, inner))
    interior = (slice(None), slice(None)) + tuple(slice(3, -3) for _ in shape)
    error = (sequential - direct)[interior].abs()
    assert error.max() < 0.03 and error.mean() < 0.005  # image range is about 4


def test_integrate_constant_velocity_gives_the_same_shift():
    velocity = torch.zeros(1, 3, 12, 12, 12)
    velocity[:, 2] = 1.5
    field = spatial.integrate_velocity(velocity, steps=7)
    interior = field[:, :, 3:-3, 3:-3, 3:-3]
    assert torch.allclose(interior[:, 2], torch.full_like(interior[:, 2], 1.5), atol=1e-4)
    assert interior[:, :2].abs().max() < 1e-6


def test_integrated_velocity_does_not_fold():
    velocity = smooth_field((32, 32), amplitude=9.0, seed=3)
    assert (spatial.jacobian_determinant(velocity) <= 0).any()  # as a displacement it folds
    field = spatial.integrate_velocity(velocity, steps=8)
    assert (spatial.jacobian_determinant(field)[:, 2:-2, 2:-2] > 0).all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_resize_field_rescales_values(ndim):
    shape = (9,) * ndim
    grid = spatial.identity_grid(shape)
    field = torch.zeros(1, ndim, *shape)
    field[:, 0] = 0.25 * grid[:, 0] + 1.0  # affine in axis 0
    resized = spatial.resize_field(field, (17,) * ndim)  # (17-1)/(9-1) = 2x finer
    new_grid = spatial.identity_grid((17,) * ndim)
    # same physical map: 1 coarse voxel = 2 fine voxels
    expected = 2.0 * (0.25 * new_grid[:, 0] / 2.0 + 1.0)
    assert torch.allclose(resized[:, 0], expected, atol=1e-5)
    assert resized[:, 1:].abs().max() == 0


def test_voxel_normalized_round_trip():
    shape = (5, 7, 9)
    coords = torch.rand(1, 3, 4, 4, 4) * 8
    back = spatial.normalized_to_voxel(spatial.voxel_to_normalized(coords, shape), shape)
    assert torch.allclose(back, coords, atol=1e-5)
    corner = torch.tensor([4.0, 0.0, 8.0]).view(1, 3, 1, 1, 1)
    # grid_sample order is reversed: (x = last axis, ..., z = first axis)
    assert spatial.voxel_to_normalized(corner, shape).flatten().tolist() == [1.0, -1.0, 1.0]


def test_matrix_to_field_of_translation():
    matrix = torch.eye(4)
    matrix[:3, 3] = torch.tensor([1.0, -2.0, 0.5])
    field = spatial.matrix_to_field(matrix, (4, 5, 6))
    assert torch.allclose(field[0, :, 2, 3, 1], torch.tensor([1.0, -2.0, 0.5]))


@pytest.mark.parametrize("shape", [(33, 40, 27), (64, 64, 64), (301, 257)])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_grid_sample_split_over_threads_equals_one_call(shape, padding):
    # the split runs one batch entry per thread along the grid's first axis (odd sizes padded)
    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        image = torch.rand(1, 2, *shape, requires_grad=True)
        grid = (torch.rand(1, *shape, len(shape)) * 2.2 - 1.1).requires_grad_(True)
        assert grid[0, ..., 0].numel() >= spatial._SPLIT_MIN_POINTS  # the split path runs
        expected = F.grid_sample(image, grid, mode="bilinear", padding_mode=padding, align_corners=True)
        got = spatial.grid_sample(image, grid, padding)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        weights = torch.randn_like(expected)
        for a, b in zip(
            torch.autograd.grad(expected, (image, grid), weights), torch.autograd.grad(got, (image, grid), weights)
        ):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("shape", [(12, 14, 9), (30, 26)])
def test_warp_at_equals_the_dense_warp_at_those_voxels(shape):
    torch.manual_seed(1)
    image = torch.rand(1, 2, *shape)
    field = torch.randn(1, len(shape), *shape) * 2.0  # some samples fall outside: border padding
    index = torch.randperm(image[0, 0].numel())[:50]
    expected = spatial.warp(image, field).reshape(1, 2, -1)[:, :, index]
    torch.testing.assert_close(spatial.warp_at(image, field, index), expected)


@pytest.mark.parametrize("shape,out", [((7, 9, 6), (15, 4, 13)), ((11, 8), (5, 23))])
def test_sample_axes_equals_sampling_the_axis_aligned_grid(shape, out):
    # per-axis coordinates beyond both ends (zero padding) and inside, scaled and offset
    torch.manual_seed(2)
    image = torch.rand(1, 3, *shape)
    axes = [torch.linspace(-1.7, s + 0.6, n) for s, n in zip(shape, out)]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]
    expected = spatial.sample(image, coords, "linear", padding="zeros")
    torch.testing.assert_close(spatial.sample_axes(image, axes), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,out", [((7, 9, 6), (8, 5, 7)), ((11, 8), (9, 13))])
def test_sample_displaced_equals_sampling_the_mapped_displaced_coordinates(shape, out):
    # an oblique, scaling voxel map after a displacement: some samples land outside
    import numpy as np

    torch.manual_seed(3)
    ndim = len(shape)
    image = torch.rand(1, 2, *shape)
    field = torch.randn(1, ndim, *out) * 1.5
    rng = np.random.default_rng(0)
    matrix = np.eye(ndim + 1)
    matrix[:ndim, :ndim] = np.eye(ndim) * 0.9 + rng.normal(0, 0.15, (ndim, ndim))
    matrix[:ndim, ndim] = rng.normal(0, 1.0, ndim)
    points = spatial.identity_grid(out) + field
    linear = torch.as_tensor(matrix[:ndim, :ndim], dtype=torch.float32)
    coords = (linear @ points.reshape(ndim, -1)).reshape(1, ndim, *out)
    coords = coords + torch.as_tensor(matrix[:ndim, ndim], dtype=torch.float32).view(1, ndim, *[1] * ndim)
    for padding in ("zeros", "border"):
        expected = spatial.sample(image, coords, "linear", padding=padding)
        actual = spatial.sample_displaced(image, matrix, field, padding=padding)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_nearest_sampling_puts_non_finite_coordinates_outside():
    image = torch.arange(1, 25, dtype=torch.int64).reshape(1, 1, 4, 6)
    coords = torch.tensor([[[[1.2, float("nan"), 2.0, float("inf")]], [[4.6, 0.0, float("-inf"), 3.0]]]])
    zeros = spatial.sample_nearest(image, coords, padding="zeros")
    assert zeros.flatten().tolist() == [image[0, 0, 1, 5].item(), 0, 0, 0]
    border = spatial.sample_nearest(image, coords, padding="border")  # non-finite -> the first voxel row/col
    assert border.flatten().tolist() == [
        image[0, 0, 1, 5].item(),
        image[0, 0, 0, 0].item(),
        image[0, 0, 2, 0].item(),
        image[0, 0, 0, 3].item(),
    ]


@pytest.mark.parametrize("shape", [(6, 7, 5), (9, 4)])
def test_block_average_means_each_block_and_moves_the_affine_to_its_centre(shape):
    import numpy as np

    image = torch.rand(1, 1, *shape, dtype=torch.float64)
    ndim = len(shape)
    factors = [2, 3, 1][:ndim]
    affine = np.diag([1.5, 2.0, 0.5, 1.0])
    affine[:3, 3] = [10.0, -4.0, 3.0]
    pooled, pooled_affine = spatial.block_average(image, affine, factors)
    first = image[(0, 0, *[slice(0, k) for k in factors])].mean()
    assert float(pooled[(0, 0, *[0] * ndim)]) == pytest.approx(float(first))
    last = image[(0, 0, *[slice((s - 1) // k * k, s) for s, k in zip(shape, factors)])].mean()  # partial block
    assert float(pooled[(0, 0, *[-1] * ndim)]) == pytest.approx(float(last))
    centre = (np.asarray(factors) - 1) / 2.0  # block 0's centre in original voxels
    expected = affine[:ndim, :ndim] @ centre + affine[:ndim, 3]
    np.testing.assert_allclose(pooled_affine[:ndim, 3], expected)
    np.testing.assert_allclose(np.diag(pooled_affine)[:ndim], np.diag(affine)[:ndim] * factors)
    assert spatial.box_variance([2, 3], [1.0, 2.0]).tolist() == pytest.approx([3 / 12, 8 / 12 * 4])


@pytest.mark.parametrize("shape", [(9, 6, 5), (11, 7)])
def test_jacobian_by_slabs_equals_the_whole_field(shape, monkeypatch):
    torch.manual_seed(4)
    field = smooth_field(shape, 3.0)
    whole = spatial.jacobian_determinant(field)
    monkeypatch.setattr(spatial, "_JACOBIAN_SLAB_VOXELS", 2 * field.numel() // field.shape[2] // 3)  # 1-row slabs
    torch.testing.assert_close(spatial.jacobian_determinant(field), whole, rtol=0, atol=0)
    tracked = field.clone().requires_grad_(True)  # with autograd: one pass, gradients flow
    tracked_det = spatial.jacobian_determinant(tracked)
    tracked_det.sum().backward()
    assert tracked.grad is not None and torch.isfinite(tracked.grad).all()
    # the untracked path (straight from torch.gradient's outputs) gives the tracked one's bits
    torch.testing.assert_close(tracked_det.detach(), whole, rtol=0, atol=0)
    # and its in-place identity on those outputs keeps the gradient exact (finite differences)
    small = field[:, :, :5].double().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(spatial.jacobian_determinant, (small,))
    assert whole.std() > 0.05  # a deformation with varied volume changes: not trivially equal


def test_sample_displaced_without_a_field_samples_the_mapped_grid():
    import numpy as np

    from voxreg.core.grid import mapped_coords

    torch.manual_seed(5)
    image = torch.rand(1, 1, 8, 9, 7)
    matrix = np.array([[0.9, 0.1, 0.0, 0.5], [-0.1, 1.1, 0.05, -0.7], [0.0, 0.0, 0.8, 1.2], [0, 0, 0, 1]])
    expected = spatial.sample(image, mapped_coords(matrix, (6, 10, 5)), "linear", padding="zeros")
    actual = spatial.sample_displaced(image, matrix, None, padding="zeros", shape=(6, 10, 5))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_invert_displacement_from_an_initial_guess():
    """``initial`` replaces the coarse stage: from the exact inverse of a constant shift the
    fixed-point steps keep it; from zero, one step of a constant field lands on it."""
    field = torch.full((1, 3, 6, 7, 5), 0.75)
    field[:, 1] = -0.5
    torch.testing.assert_close(spatial.invert_displacement(field, 1, initial=torch.zeros_like(field)), -field)
    torch.testing.assert_close(spatial.invert_displacement(field, 3, initial=-field), -field)
    with pytest.raises(ValueError, match="does not match"):
        spatial.invert_displacement(field, 1, initial=torch.zeros(1, 3, 6, 7, 4))


def test_a_large_grid_gets_the_same_identity_without_caching_it(monkeypatch):
    shape = (7, 9, 8)
    cached = spatial._cached_normalized_identity(shape, torch.device("cpu"), torch.float32)[0]
    monkeypatch.setattr(spatial, "CACHE_MAX_VOXELS", 100)
    before = spatial._cached_normalized_identity.cache_info().currsize
    built = spatial._normalized_identity((9, 8, 7), torch.device("cpu"), torch.float32)
    assert spatial._cached_normalized_identity.cache_info().currsize == before  # not cached
    assert torch.equal(spatial._normalized_identity(shape, torch.device("cpu"), torch.float32), cached)
    field = torch.randn(1, 3, *shape) * 0.5
    image = torch.rand(1, 1, *shape)
    monkeypatch.setattr(spatial, "CACHE_MAX_VOXELS", 16_000_000)
    expected = spatial.warp(image, field)
    monkeypatch.setattr(spatial, "CACHE_MAX_VOXELS", 100)
    assert torch.equal(spatial.warp(image, field), expected) and built.shape == (9, 8, 7, 3)


@pytest.mark.parametrize("shape", [(7, 9, 8), (5, 11), (1, 4, 3)])
def test_the_normalised_identity_is_built_axis_by_axis_with_the_same_values(shape):
    """Built from 1D ramps: bit-identical to normalising the voxel identity grid; corners at
    -1 and +1 in grid_sample's reversed axis order (a size-1 axis stays at -1)."""
    built = spatial._cached_normalized_identity.__wrapped__(shape, torch.device("cpu"), torch.float32)
    reference = spatial.voxel_to_normalized(spatial.identity_grid(shape), shape).contiguous()
    assert built.shape == (1, *shape, len(shape)) and built.is_contiguous()
    assert torch.equal(built, reference)
    last = built[(0, *[s - 1 for s in shape])]
    expected_last = [1.0 if s > 1 else -1.0 for s in reversed(shape)]
    assert last.tolist() == expected_last and bool((built[(0, *[0] * len(shape))] == -1.0).all())


@pytest.mark.parametrize("shape", [(23, 17, 9), (40, 31)])
def test_mapped_coords_equal_the_float64_product_without_full_size_float64_arrays(shape, monkeypatch):
    """Per-axis float64 sums slab by slab (slabs forced small here) give the same float32
    coordinates as the matrix product over every voxel index in float64."""
    from voxreg.core import grid

    monkeypatch.setattr(grid, "_MAPPED_SLAB_VOXELS", 64)
    ndim = len(shape)
    rng = np.random.default_rng(3)
    matrix = np.eye(ndim + 1)
    matrix[:ndim, :ndim] = rng.normal(size=(ndim, ndim))
    matrix[:ndim, ndim] = rng.normal(size=ndim) * 50.0
    built = grid.mapped_coords(matrix, shape)
    reference = matrix[:ndim, :ndim] @ np.indices(shape, dtype=np.float64).reshape(ndim, -1) + matrix[:ndim, ndim:]
    assert built.dtype == torch.float32 and built.shape == (1, ndim, *shape)
    assert torch.equal(built, torch.from_numpy(reference.reshape(1, ndim, *shape).astype(np.float32)))
    corner = np.asarray(shape) - 1.0
    np.testing.assert_allclose(
        built[(0, slice(None), *[s - 1 for s in shape])].numpy(),
        matrix[:ndim, :ndim] @ corner + matrix[:ndim, ndim],
        rtol=1e-6,
    )


@pytest.mark.parametrize("shape", [(9, 7, 6), (11, 5)])
def test_slab_by_slab_sampling_gives_the_bits_of_the_whole_grid(monkeypatch, shape):
    """sample_displaced, sample_axes and the nearest-neighbour resampling fill their output a
    slab of the first axis at a time (bounded temporaries): the same bits as in one piece."""
    from voxreg import io
    from voxreg.core.image import Image

    ndim = len(shape)
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(1, 2, *shape, generator=gen)
    field = torch.randn(1, ndim, *shape, generator=gen)
    matrix = np.eye(ndim + 1)
    matrix[:ndim, :ndim] += 0.05 * np.arange(ndim * ndim).reshape(ndim, ndim) / ndim
    matrix[:ndim, ndim] = 0.7
    axes = [torch.linspace(-1.5, s + 0.5, 2 * s + 1, dtype=torch.float64) for s in shape]
    labels = Image(np.arange(np.prod(shape), dtype=np.int16).reshape(shape), np.diag([1.1, 0.9, 1.0, 1.0]))
    fixed = Image(np.zeros(shape, np.float32), np.eye(4))

    def outputs():
        return (
            spatial.sample_displaced(image, matrix, field, padding="zeros"),
            spatial.sample_axes(image, axes),
            io.resample_to(labels, fixed, field=field[0].numpy()).array,
            io.resample_to(labels, fixed).array,
        )

    monkeypatch.setattr(spatial, "SLAB_VOXELS", 1 << 30)
    whole = outputs()
    monkeypatch.setattr(spatial, "SLAB_VOXELS", 5)  # one row (or plane) per slab
    assert len(spatial.first_axis_slabs(shape)) == shape[0]
    for a, b in zip(whole, outputs()):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.unique(whole[2]).size > 10  # labels really moved around, not all background


def test_first_axis_slabs_cover_the_axis_once():
    slabs = spatial.first_axis_slabs((10, 4, 4), voxels=48)  # 3 rows of 16 voxels each
    assert [(s.start, s.stop) for s in slabs] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert spatial.first_axis_slabs((2, 100), voxels=10) == [slice(0, 1), slice(1, 2)]


@pytest.mark.parametrize("shape", [(30, 26, 22), (40, 34)])
def test_sampling_only_the_reached_box_gives_the_same_bits(shape, monkeypatch):
    """A scan with a zero margin (a brain-extracted one) is sampled only in the box of the
    output grid that can reach its nonzero voxels: the same bits as sampling every voxel, for
    linear and nearest interpolation, through an affine map and a displacement field."""
    from voxreg import io
    from voxreg.core.image import Image
    from voxreg.core.synthetic import smooth_random_field

    ndim = len(shape)
    g = np.random.default_rng(0)
    values = np.zeros(shape, np.float32)
    inner = tuple(slice(n // 4, 3 * n // 4) for n in shape)
    values[inner] = g.random([s.stop - s.start for s in inner]).astype(np.float32) + 0.5
    labels = (values * 4).astype(np.int16)
    affine = np.diag([1.2, 1.2, 1.2, 1.0])  # moving voxels of 1.2 mm, shifted 3 mm along the first axis
    affine[0, 3] = 3.0
    fixed = Image(np.zeros(shape, np.float32), np.eye(4))
    field = smooth_random_field(shape, max_displacement=2.0, seed=1)
    to_moving = np.eye(ndim + 1)  # fixed voxel -> moving voxel
    to_moving[:ndim, :ndim] = np.eye(ndim) / 1.2
    to_moving[0, ndim] = -3.0 / 1.2
    box = spatial.reached_box(torch.from_numpy(values)[None, None], to_moving, torch.as_tensor(field), shape)
    assert box is not None and np.prod([b.stop - b.start for b in box]) < 0.8 * np.prod(shape)  # a real crop
    results = []
    for crop in (True, False):
        if not crop:
            monkeypatch.setattr(spatial, "reached_box", lambda *args: None)
        linear = io.resample_to(Image(values, affine), fixed, field=field)
        nearest = io.resample_to(Image(labels, affine, kind="label"), fixed, field=field)
        results.append((linear.array, nearest.array))
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])
    assert results[1][0].any() and not results[1][0][tuple(slice(0, b.start) for b in box[:1])].any()


def test_reached_box_is_none_without_a_zero_margin_and_empty_for_a_zero_image():
    field = torch.zeros(1, 3, 8, 8, 8)
    assert spatial.reached_box(torch.rand(1, 1, 8, 8, 8) + 0.1, np.eye(4), field, (8, 8, 8)) is None
    assert spatial.reached_box(torch.zeros(1, 1, 8, 8, 8), np.eye(4), field, (8, 8, 8)) == (slice(0, 0),) * 3
    field[0, 0, 0, 0, 0] = float("nan")
    margin = torch.zeros(1, 1, 8, 8, 8)
    margin[..., 3:5, 3:5, 3:5] = 1.0
    assert spatial.reached_box(margin, np.eye(4), field, (8, 8, 8)) is None  # a non-finite field: no crop
    assert spatial.reached_box(margin, np.eye(4), torch.zeros(1, 3, 8, 8, 8), (8, 8, 8)) == (slice(1, 7),) * 3


def test_vector_length_is_the_euclidean_norm_along_the_axis():
    vectors = torch.tensor([[3.0, 0.0, 1.0], [4.0, 0.0, 2.0], [12.0, 0.0, 2.0]])  # components along dim 0
    torch.testing.assert_close(spatial.vector_length(vectors, dim=0), torch.tensor([13.0, 0.0, 3.0]))
    rng = torch.Generator().manual_seed(0)
    field = torch.randn(2, 3, 5, 6, 7, generator=rng)
    torch.testing.assert_close(spatial.vector_length(field, dim=1), torch.linalg.vector_norm(field, dim=1))
