"""The fused local NCC of instance optimisation (:class:`voxreg.losses.FixedLocalNCC`)
against the reference :func:`voxreg.losses.local_ncc`: values and gradients, 2D and 3D,
odd sizes, windows clipped by small axes, masks, structure weights, signed NCC."""

from __future__ import annotations

import pytest
import torch

from voxreg import losses


def _pair(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    fixed = torch.rand(1, 1, *shape, generator=generator, dtype=torch.float64)
    moving = 0.6 * fixed + 0.4 * torch.rand(1, 1, *shape, generator=generator, dtype=torch.float64)
    # a flat patch in both images (eps path) and a zero region (background)
    region = tuple(slice(0, max(1, s // 3)) for s in shape)
    fixed[(0, 0, *region)] = 0.5
    moving[(0, 0, *region)] = 0.5
    return fixed, moving


CASES = [
    ((17, 13), 5),
    ((9, 11), 9),  # window clipped along both axes
    ((3, 20), 5),  # thin axis: window clipped to 3
    ((2, 15), 7),  # axis of 2: window clipped to 1
    ((11, 9, 7), 5),
    ((5, 12, 3), 9),
    ((1, 8, 6), 3),
    ((13, 10, 9), (3, 5, 1)),
]


@pytest.mark.parametrize(("shape", "window"), CASES)
@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_ncc_matches_reference(shape, window, squared, masked):
    fixed, moving = _pair(shape)
    mask = (moving > 0.3).to(moving.dtype) if masked else None
    a = moving.clone().requires_grad_(True)
    b = moving.clone().requires_grad_(True)
    reference = losses.local_ncc(fixed, a, window, squared=squared, mask=mask)
    fused = losses.FixedLocalNCC(fixed, window, squared=squared)(b, mask)
    reference.backward()
    fused.backward()
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("shape", [(15, 12), (9, 8, 11)])
def test_fused_ncc_structure_weights_and_float32(shape):
    fixed, moving = _pair(shape, seed=3)
    fixed, moving = fixed.float(), moving.float()
    a = moving.clone().requires_grad_(True)
    b = moving.clone().requires_grad_(True)
    reference = losses.local_ncc(fixed, a, 5, structure=0.1)
    fused = losses.FixedLocalNCC(fixed, 5, structure=0.1)(b)
    reference.backward()
    fused.backward()
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7)


def test_fused_ncc_gradcheck():
    fixed, moving = _pair((6, 5, 7), seed=1)
    ncc = losses.FixedLocalNCC(fixed, 3)
    assert torch.autograd.gradcheck(lambda w: ncc(w), (moving.clone().requires_grad_(True),))


def test_box_sum_is_unnormalised_box_filter():
    image = torch.rand(1, 2, 7, 10, 5, dtype=torch.float64)
    ones = torch.ones(1, 1, 7, 10, 5, dtype=torch.float64)
    window = losses.similarity.clip_window((5, 3, 7), image.shape[2:])
    ratio = losses.box_sum(image, window) / losses.box_sum(ones, window)
    torch.testing.assert_close(ratio, losses.box_filter(image, (5, 3, 7)))


def test_fused_ncc_rejects_other_shape():
    fixed, moving = _pair((8, 8))
    with pytest.raises(ValueError):
        losses.FixedLocalNCC(fixed, 5)(moving[..., :7])


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 4), (1, 5, 3)])
def test_gradient_penalty_analytic_backward(shape):
    field = torch.randn(2, len(shape), *shape, dtype=torch.float64)
    a = field.clone().requires_grad_(True)
    b = field.clone().requires_grad_(True)
    terms = []
    for axis in range(len(shape)):
        diff = a.diff(dim=2 + axis)
        terms.append((diff * diff).mean())
    reference = sum(terms) / len(shape)
    value = losses.gradient_penalty(b, "l2")
    (3.0 * reference).backward()
    (3.0 * value).backward()
    if 1 in shape:
        assert torch.isnan(value)
        return
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(b.grad, a.grad)
