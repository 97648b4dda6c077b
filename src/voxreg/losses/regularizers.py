"""Regularisers of displacement fields ``(N, ndim, *spatial)`` in voxels (lower is better):
gradient penalty (VoxelMorph's ``Grad``) and bending energy."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from voxreg.core.spatial import spatial_ndim

Penalty = Literal["l1", "l2"]


# --------------------------------------------------------------------------- regularisers


def _forward_diff(tensor: Tensor, axis: int) -> Tensor:
    """Forward difference along spatial ``axis`` (size shrinks by one there)."""
    dim = 2 + axis
    n = tensor.shape[dim]
    return tensor.narrow(dim, 1, n - 1) - tensor.narrow(dim, 0, n - 1)


class _GradL2(torch.autograd.Function):
    """L2 gradient penalty with an analytic gradient, accumulated in the forward pass with
    two in-place adds per axis (no autograd slice buffers; the field is large at 1 mm)."""

    @staticmethod
    def forward(ctx, field: Tensor) -> Tensor:  # type: ignore[override]
        ndim = field.dim() - 2
        total = 0.0
        grad = torch.zeros_like(field) if ctx.needs_input_grad[0] else None
        for axis in range(ndim):
            dim, n = 2 + axis, field.shape[2 + axis]
            diff = _forward_diff(field, axis)
            total += float(torch.linalg.vector_norm(diff)) ** 2 / diff.numel()
            if grad is not None:
                diff.mul_(2.0 / (ndim * diff.numel()))
                grad.narrow(dim, 1, n - 1).add_(diff)
                grad.narrow(dim, 0, n - 1).sub_(diff)
        ctx.save_for_backward(grad)
        return field.new_tensor(total / ndim)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_output


def gradient_penalty(field: Tensor, penalty: Penalty = "l2") -> Tensor:
    """VoxelMorph's ``Grad``: for each axis the mean over (N, channels, voxels) of the
    squared (``'l2'``) or absolute (``'l1'``) forward differences, averaged over axes.

    ``field = a * (x_0 + ... + x_{n-1})`` in every channel gives ``a**2`` (``|a|``).
    """
    if penalty not in ("l1", "l2"):
        raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
    ndim = spatial_ndim(field)
    if penalty == "l2" and all(n > 1 for n in field.shape[2:]):
        result: Tensor = _GradL2.apply(field)
        return result
    terms = []
    for axis in range(ndim):
        diff = _forward_diff(field, axis)
        terms.append((diff.abs() if penalty == "l1" else diff * diff).mean())
    return sum(terms) / ndim


def bending_energy(field: Tensor) -> Tensor:
    """Bending energy: mean over (N, channels, voxels) of ``sum_{i,j} (d2 u / dx_i dx_j)^2``
    (cross terms counted twice), each term averaged over the voxels where its finite
    difference is defined (central second differences, forward-forward cross terms).

    0 for affine fields; ``u_c = a x_0^2`` gives ``4 a^2``; ``u_c = a x_0 x_1`` gives ``2 a^2``.
    """
    ndim = spatial_ndim(field)
    total = field.new_zeros(())
    for i in range(ndim):
        first = _forward_diff(field, i)
        total = total + _forward_diff(first, i).square().mean()
        for j in range(i + 1, ndim):
            total = total + 2 * _forward_diff(first, j).square().mean()
    return total
