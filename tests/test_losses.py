"""Tests for voxreg.losses: known values on synthetic images and fields (2D and 3D)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from voxreg import losses as L


def _smooth_image(shape, seed=0):
    """A smooth random image in [0, 1], shape (1, 1, *shape)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *[max(s // 4, 2) for s in shape], generator=g)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    img = torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)
    img = img + 0.05 * torch.rand(1, 1, *shape, generator=g)
    return (img - img.min()) / (img.max() - img.min())


def _grid(shape, dtype=torch.float32):
    """Voxel coordinates (ndim, *shape)."""
    axes = [torch.arange(s, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


SHAPES = [(20, 24), (12, 14, 16)]


# --------------------------------------------------------------------------- NCC


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("squared", [True, False])
def test_local_ncc_identical_is_one(shape, squared):
    img = _smooth_image(shape)
    assert L.local_ncc(img, img, squared=squared).item() == pytest.approx(1.0, abs=1e-4)
    assert L.NCCLoss(squared=squared)(img, img).item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_local_ncc_invariant_to_affine_intensity(shape):
    fixed, other = _smooth_image(shape, 0), _smooth_image(shape, 1)
    ref = L.local_ncc(fixed, other).item()
    assert 0.0 < ref < 0.9
    assert L.local_ncc(fixed, 3.0 * other + 2.0).item() == pytest.approx(ref, abs=1e-4)
    assert L.local_ncc(0.1 * fixed - 5.0, other).item() == pytest.approx(ref, abs=1e-4)
    # squared NCC ignores the sign, signed NCC flips it
    assert L.local_ncc(fixed, -other).item() == pytest.approx(ref, abs=1e-4)
    signed = L.local_ncc(fixed, other, squared=False).item()
    assert L.local_ncc(fixed, 1 - other, squared=False).item() == pytest.approx(-signed, abs=1e-4)


def test_local_ncc_matches_brute_force_with_borders():
    img_a = torch.rand(1, 1, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    img_b = torch.rand(1, 1, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = L.local_ncc_map(img_a, img_b, window=3, eps=0.0)[0, 0].numpy()
    a, b = img_a[0, 0].numpy(), img_b[0, 0].numpy()
    expected = np.zeros_like(a)
    for i in range(7):
        for j in range(8):
            pa = a[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].ravel()
            pb = b[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].ravel()
            cov = np.mean(pa * pb) - pa.mean() * pb.mean()
            expected[i, j] = cov**2 / (pa.var() * pb.var())
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_box_filter_gives_border_clipped_means_with_and_without_gradient_tracking():
    # no gradient tracked: shifted-add sums over counts; tracked: average pools (faster backward)
    image = torch.rand(1, 2, 5, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    window = (3, 5, 9)  # 9 > 7: clipped to 7 along the last axis
    plain = L.box_filter(image, window)
    tracked = L.box_filter(image.clone().requires_grad_(True), window)
    assert tracked.requires_grad and not plain.requires_grad
    torch.testing.assert_close(plain, tracked.detach(), rtol=1e-12, atol=1e-12)
    a = image.numpy()
    for i, j, k in [(0, 0, 0), (2, 3, 3), (4, 5, 6), (1, 0, 5)]:
        box = a[:, :, max(i - 1, 0) : i + 2, max(j - 2, 0) : j + 3, max(k - 3, 0) : k + 4]
        np.testing.assert_allclose(plain[0, :, i, j, k].numpy(), box.mean(axis=(2, 3, 4))[0], rtol=1e-12)


def test_local_ncc_same_with_and_without_gradient_tracking():
    gen = torch.Generator().manual_seed(6)
    fixed = torch.rand(1, 1, 10, 9, 8, dtype=torch.float64, generator=gen)
    warped = (0.5 * fixed + torch.rand(1, 1, 10, 9, 8, dtype=torch.float64, generator=gen)).requires_grad_(True)
    tracked = L.local_ncc(fixed, warped, 5)
    with torch.no_grad():
        plain = L.local_ncc(fixed, warped, 5)
    torch.testing.assert_close(plain, tracked.detach(), rtol=1e-12, atol=1e-12)
    assert 0.1 < float(plain) < 0.9  # partly correlated


def test_local_ncc_anisotropic_window_and_bad_window():
    img = _smooth_image((10, 12, 14))
    assert L.local_ncc(img, img, window=(3, 5, 1)).item() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="odd"):
        L.local_ncc(img, img, window=4)
    with pytest.raises(ValueError, match="same shape"):
        L.local_ncc(img, img[..., :-1])


@pytest.mark.parametrize(
    "fn",
    [
        lambda f, w: L.local_ncc(f, w),
        lambda f, w: L.local_ncc(f, w, squared=False),
        lambda f, w: L.global_ncc(f, w),
        lambda f, w: L.mse(f, w),
        lambda f, w: L.mutual_information(f, w, bins=16),
    ],
)
def test_constant_images_finite_values_and_gradients(fn):
    shape = (10, 11, 12)
    for fixed in (torch.full((1, 1, *shape), 0.3), _smooth_image(shape)):
        warped = torch.full((1, 1, *shape), 0.7, requires_grad=True)
        value = fn(fixed, warped)
        value.backward()
        assert torch.isfinite(value)
        assert torch.isfinite(warped.grad).all()


def test_local_ncc_gradcheck():
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 5, 6, dtype=torch.float64, generator=g)
    warped = torch.rand(1, 1, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: L.local_ncc(fixed, w, window=3, eps=1e-12), (warped,))


def test_local_ncc_mask_weights_mean():
    fixed, other = _smooth_image((16, 16), 0), _smooth_image((16, 16), 1)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1
    values = L.local_ncc_map(fixed, other)
    assert L.local_ncc(fixed, other, mask=mask).item() == pytest.approx(values[..., :8, :].mean().item(), rel=1e-5)


def test_global_ncc_known_values():
    img = _smooth_image((12, 13, 14))
    assert L.global_ncc(img, img).item() == pytest.approx(1.0, abs=1e-5)
    assert L.global_ncc(img, 2 * img + 1).item() == pytest.approx(1.0, abs=1e-5)
    assert L.global_ncc(img, 1 - img).item() == pytest.approx(-1.0, abs=1e-5)


def test_mse_known_values():
    a = torch.zeros(2, 1, 4, 5)
    assert L.mse(a, a).item() == 0.0
    assert L.mse(a, a + 2).item() == pytest.approx(4.0)
    mask = torch.zeros(1, 1, 4, 5)
    mask[..., 0, :] = 1
    b = a.clone()
    b[..., 1:, :] = 10
    assert L.mse(a, b, mask=mask).item() == 0.0
    assert L.MSELoss()(a, a + 2).item() == pytest.approx(4.0)


# --------------------------------------------------------------------------- MI


def test_mi_maximal_for_identical_image():
    img = _smooth_image((24, 24, 24))
    shifted = torch.roll(img, shifts=3, dims=2)
    shuffled = img.flatten()[torch.randperm(img.numel(), generator=torch.Generator().manual_seed(0))].view_as(img)
    mi_self = L.mutual_information(img, img).item()
    assert mi_self > L.mutual_information(img, shifted).item() + 0.1
    assert L.mutual_information(img, shuffled).item() < 0.05
    assert L.MILoss()(img, img).item() == pytest.approx(-mi_self)


def test_mi_is_multimodal_while_ncc_is_not():
    img = _smooth_image((20, 22))
    inverted = 1.0 - img
    assert L.mutual_information(img, inverted).item() == pytest.approx(L.mutual_information(img, img).item(), rel=1e-4)
    assert L.global_ncc(img, inverted).item() == pytest.approx(-1.0, abs=1e-5)
    assert L.NCCLoss(squared=False)(img, inverted).item() == pytest.approx(2.0, abs=1e-3)


def test_mi_with_itself_equals_entropy():
    bins = 8
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, bins, (1, 1, 16, 16, 16), generator=g).float() / (bins - 1)
    # narrow kernel: the Parzen estimate is the plain histogram of 8 equally likely levels
    h = L.entropy(levels, bins=bins, sigma_ratio=0.1).item()
    assert h == pytest.approx(math.log(bins), abs=5e-3)
    mi = L.mutual_information(levels, levels, bins=bins, sigma_ratio=0.1).item()
    assert mi == pytest.approx(h, abs=1e-6)
    # any kernel width: MI(a, a) = 2 H(a) - H(a, a) <= H(a) with the same estimator
    img = _smooth_image((16, 16, 16))
    h, h_joint = L.entropy(img).item(), L.joint_entropy(img, img).item()
    mi = L.mutual_information(img, img).item()
    assert mi == pytest.approx(2 * h - h_joint, abs=1e-5)
    assert 0 < mi < h  # the kernel blurs the joint histogram off its diagonal


def test_joint_histogram_sums_to_one_and_mask_equals_crop():
    fixed, warped = _smooth_image((16, 20), 0), _smooth_image((16, 20), 1)
    hist = L.joint_histogram(fixed, warped, bins=16)
    assert hist.shape == (1, 16, 16)
    assert hist.sum().item() == pytest.approx(1.0, abs=1e-6)
    mask = torch.zeros(1, 1, 16, 20)
    mask[..., :, :7] = 1
    masked = L.mutual_information(fixed, warped, mask=mask).item()
    cropped = L.mutual_information(fixed[..., :7].contiguous(), warped[..., :7].contiguous()).item()
    assert masked == pytest.approx(cropped, abs=1e-5)


def test_mi_chunking_matches_single_chunk(monkeypatch):
    fixed = _smooth_image((10, 12, 9), 0)
    warped = _smooth_image((10, 12, 9), 1).requires_grad_(True)
    value = L.mutual_information(fixed, warped, bins=12)
    (grad,) = torch.autograd.grad(value, warped)
    monkeypatch.setattr(L.similarity, "_MI_CHUNK", 97)
    value_chunked = L.mutual_information(fixed, warped, bins=12)
    (grad_chunked,) = torch.autograd.grad(value_chunked, warped)
    assert value_chunked.item() == pytest.approx(value.item(), abs=1e-6)
    torch.testing.assert_close(grad_chunked, grad, rtol=1e-3, atol=1e-3 * grad.abs().max().item())


def test_mi_gradcheck_both_inputs_and_mask():
    g = torch.Generator().manual_seed(1)
    fixed = (0.05 + 0.9 * torch.rand(1, 1, 4, 5, dtype=torch.float64, generator=g)).requires_grad_(True)
    warped = (0.05 + 0.9 * torch.rand(1, 1, 4, 5, dtype=torch.float64, generator=g)).requires_grad_(True)
    mask = (torch.rand(1, 1, 4, 5, generator=g) > 0.3).double()
    assert torch.autograd.gradcheck(lambda f, w: L.mutual_information(f, w, bins=6, mask=mask), (fixed, warped))


def test_mi_subsampling_is_deterministic_and_close():
    fixed, warped = _smooth_image((32, 32, 32), 0), _smooth_image((32, 32, 32), 0) ** 2
    full = L.mutual_information(fixed, warped).item()
    sub = L.mutual_information(fixed, warped, max_voxels=8000).item()
    assert L.mutual_information(fixed, warped, max_voxels=8000).item() == sub
    assert sub == pytest.approx(full, rel=0.1)
    assert L.MILoss(max_voxels=8000, seed=None)(fixed, warped).item() == pytest.approx(-full, rel=0.1)


def test_mi_bad_arguments():
    img = _smooth_image((8, 8))
    with pytest.raises(ValueError, match="bins"):
        L.mutual_information(img, img, bins=1)
    with pytest.raises(ValueError, match="mask"):
        L.mutual_information(img, img, mask=torch.ones(1, 1, 4, 4))


# --------------------------------------------------------------------------- regularisers


@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_penalty_linear_fields(shape):
    ndim, a = len(shape), 0.3
    grid = _grid(shape)
    field = (a * grid.sum(0)).expand(ndim, *shape)[None].clone()  # every channel a * sum(x)
    assert L.gradient_penalty(field, "l2").item() == pytest.approx(a**2, rel=1e-5)
    assert L.gradient_penalty(field, "l1").item() == pytest.approx(a, rel=1e-5)
    single = torch.zeros(1, ndim, *shape)
    single[0, 0] = a * grid[0]  # only channel 0, only along axis 0
    assert L.gradient_penalty(single).item() == pytest.approx(a**2 / ndim**2, rel=1e-5)
    assert L.GradLoss("l1")(torch.zeros(1, ndim, *shape)).item() == 0.0


def test_gradient_penalty_bad_penalty():
    with pytest.raises(ValueError, match="l1"):
        L.gradient_penalty(torch.zeros(1, 2, 4, 4), "l3")


@pytest.mark.parametrize("shape", SHAPES)
def test_bending_energy_known_values(shape):
    ndim, a = len(shape), 0.2
    grid = _grid(shape, torch.float64)
    affine = torch.stack([0.1 * grid[0] - 0.3 * grid[-1] + 2 for _ in range(ndim)])[None]
    assert L.bending_energy(affine).item() == pytest.approx(0.0, abs=1e-12)
    quadratic = (a * grid[0] ** 2).expand(ndim, *shape)[None]
    assert L.bending_energy(quadratic).item() == pytest.approx(4 * a**2, rel=1e-9)
    cross = (a * grid[0] * grid[1]).expand(ndim, *shape)[None]
    assert L.bending_energy(cross).item() == pytest.approx(2 * a**2, rel=1e-9)
    assert L.BendingLoss()(quadratic).item() == pytest.approx(4 * a**2, rel=1e-9)


def test_regularisers_have_gradients():
    field = torch.randn(1, 3, 6, 7, 8, requires_grad=True)
    (L.gradient_penalty(field) + L.bending_energy(field)).backward()
    assert torch.isfinite(field.grad).all() and field.grad.abs().sum() > 0


# --------------------------------------------------------------------------- Dice


def test_dice_known_values():
    a = torch.zeros(1, 2, 4, 4)
    a[0, 0, :2] = 1
    a[0, 1, 2:] = 1
    assert L.dice(a, a).item() == pytest.approx(1.0)
    assert L.dice(a, a.flip(1)).item() == pytest.approx(0.0)
    b = torch.zeros(1, 2, 4, 4)
    b[0, 0, 1:3] = 1  # class 0: 8 voxels each, 4 shared -> 0.5
    b[0, 1, :, :1] = 1  # class 1: 8 and 4 voxels, 2 shared -> 4 / 12
    per_class = L.dice(a, b, reduction="none")
    torch.testing.assert_close(per_class, torch.tensor([[0.5, 1 / 3]]))
    assert L.DiceLoss()(a, b).item() == pytest.approx(1 - (0.5 + 1 / 3) / 2)
    soft = torch.full((1, 1, 2, 2), 0.5)
    assert L.dice(soft, torch.ones(1, 1, 2, 2)).item() == pytest.approx(2 * 2 / 6)


# --------------------------------------------------------------------------- registries


def test_registries_by_name():
    assert isinstance(L.similarity_loss("ncc", window=5), L.NCCLoss)
    assert isinstance(L.similarity_loss("MSE"), L.MSELoss)
    assert isinstance(L.similarity_loss("mi", bins=16), L.MILoss)
    assert L.regularizer("l1").penalty == "l1"
    assert L.regularizer("l2").penalty == "l2"
    assert isinstance(L.regularizer("bending"), L.BendingLoss)
    assert set(L.SIMILARITY_LOSSES) == {"ncc", "mse", "mi"}


def test_registries_reject_unknown_names():
    with pytest.raises(ValueError, match="mi, mse, ncc"):
        L.similarity_loss("cc")
    with pytest.raises(ValueError, match="bending, l1, l2"):
        L.regularizer("tv")


def test_structure_weighting_ignores_flat_fixed_background():
    """Noise in the moving background, where the fixed image is flat, does not count."""
    g = torch.Generator().manual_seed(1)
    fixed = torch.zeros(1, 1, 24, 24, 24)
    fixed[..., 6:18, 6:18, 6:18] = torch.rand(1, 1, 12, 12, 12, generator=g)
    noisy = fixed.clone()
    background = fixed == 0
    noisy[background] = 0.05 * torch.rand(int(background.sum()), generator=g)
    plain = L.local_ncc(fixed, noisy, window=5)
    weighted = L.local_ncc(fixed, noisy, window=5, structure=1e-3)
    assert plain < 0.9  # the noisy background drags plain NCC down
    assert weighted > 0.97  # weighted NCC scores the (identical) structured part only


@pytest.mark.parametrize("window", [[9, 9, 9], [5, 3, 7], [9, 1, 9]])
def test_box_sum_by_slabs_is_bit_identical_to_the_whole_image(window, monkeypatch):
    """A large image is box-summed slab by slab (slabs forced small here: 2 rows each, halos
    of the window's radius); the values equal the whole-image sum exactly, also at the first
    and last rows (zero outside), and a hand-computed corner: a constant image's corner
    voxel sums the (r+1)^3 voxels of its box inside the image."""
    from voxreg.losses import similarity

    image = torch.rand(1, 2, 11, 6, 8, generator=torch.Generator().manual_seed(4))
    whole = similarity._box_sum_whole(image, window)
    monkeypatch.setattr(similarity, "BOX_SUM_SLAB_ELEMENTS", 2 * 6 * 8 * 2)
    assert torch.equal(similarity.box_sum(image, window), whole)
    ones = similarity.box_sum(torch.ones(1, 1, 11, 6, 8), window)
    inside = [min(size // 2, n - 1) + 1 for size, n in zip(window, (11, 6, 8))]
    assert float(ones[0, 0, 0, 0, 0]) == float(inside[0] * inside[1] * inside[2])


@pytest.mark.parametrize(("shape", "max_voxels"), [((2, 1, 30, 28, 26), 5000), ((1, 2, 40, 30), None)])
def test_mutual_information_many_is_mutual_information_pair_by_pair(shape, max_voxels, monkeypatch):
    """Same draw, same chunks (a chunk of 700 voxels forces several), same float64 sums: the
    shared fixed weights change no bit of any pair's value."""
    import voxreg.losses.similarity as S

    monkeypatch.setattr(S, "_MI_CHUNK", 700)
    g = torch.Generator().manual_seed(5)
    fixed = torch.rand(*shape, generator=g) * 1.2 - 0.1  # some values outside [0, 1]: clamped
    others = [fixed.roll(3, -1), fixed * 0.5 + 0.3 * torch.rand(*shape, generator=g), torch.rand(*shape, generator=g)]
    many = L.mutual_information_many(fixed, others, 16, max_voxels=max_voxels)
    single = [L.mutual_information(fixed, other, 16, max_voxels=max_voxels) for other in others]
    assert [float(v) for v in many] == [float(v) for v in single]
    assert float(single[1]) > float(single[2]) + 0.1  # the pairs differ: the comparison is not trivial


@pytest.mark.parametrize(("bins", "sigma_ratio"), [(32, 0.5), (64, 0.5), (16, 1.0), (8, 2.0)])
def test_banded_parzen_weights_are_the_gaussian_weights(bins, sigma_ratio):
    """Only the centres within reach of each value's nearest are computed (7 of 32 bins at
    the report's width); the rest are zero. Every row equals the normalised Gaussian of all
    the centres, computed here in float64, to float32 rounding, also at 0, 1 and between two
    centres; a width too large for a band computes every centre (the last case)."""
    import voxreg.losses.similarity as S

    x = torch.cat(
        [torch.rand(2000, generator=torch.Generator().manual_seed(2)), torch.tensor([0.0, 1.0, 0.5 / (bins - 1)])]
    )
    centers, sigma = S._parzen_centres(bins, sigma_ratio, x)
    weights = S._parzen_weights(x, centers, sigma, torch.empty(x.numel(), bins))
    exact = torch.exp(-((x.double()[:, None] - centers.double()[None, :]) ** 2) / (2 * sigma**2))
    exact /= exact.sum(dim=1, keepdim=True)
    assert torch.allclose(weights.double(), exact, rtol=0, atol=3e-7)
    assert torch.allclose(weights.sum(dim=1), torch.ones(x.numel()), atol=1e-6)
    reach = S.parzen_reach(sigma * (bins - 1))
    assert reach == {0.5: 3, 1.0: 6, 2.0: 13}[sigma_ratio]
    computed = (weights > 0).sum(dim=1)
    assert int(computed.max()) == (2 * reach + 1 if 2 * reach + 1 < bins else bins)
