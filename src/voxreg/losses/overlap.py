"""Overlap: soft Dice of one-hot or probability tensors ``(N, K, *spatial)``."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from voxreg.losses.similarity import _check_pair

Reduction = Literal["mean", "none"]


# --------------------------------------------------------------------------- Dice


def dice(a: Tensor, b: Tensor, reduction: Reduction = "mean", eps: float = 1e-5) -> Tensor:
    """Soft Dice ``2 sum(a b) / max(sum(a) + sum(b), eps)`` of one-hot or probability
    tensors ``(N, K, *S)``: per (sample, class) ``(N, K)`` with ``reduction='none'``,
    else their mean. A class absent from both gives 0."""
    _check_pair(a, b)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    dims = tuple(range(2, a.dim()))
    top = 2 * (a * b).sum(dim=dims)
    bottom = (a + b).sum(dim=dims).clamp_min(eps)
    scores = top / bottom
    return scores if reduction == "none" else scores.mean()
