"""Thin ``nn.Module`` losses over the pure functions, and the registries selecting them by name.

The modules always return a **loss to minimise**:

============  ===================================  =====================
module        loss                                 optimum
============  ===================================  =====================
NCCLoss       ``1 - local_ncc``                    0
MSELoss       ``mse``                              0
MILoss        ``-mutual_information`` (nats)       ``-H(fixed)``
GradLoss      ``gradient_penalty``                 0
BendingLoss   ``bending_energy``                   0
DiceLoss      ``1 - dice``                         0
============  ===================================  =====================

Select them by name with :func:`similarity_loss` (``'ncc' | 'mse' | 'mi'``) and
:func:`regularizer` (``'l2' | 'l1' | 'bending'``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from voxreg.losses.overlap import dice
from voxreg.losses.regularizers import Penalty, bending_energy, gradient_penalty
from voxreg.losses.similarity import local_ncc, mse, mutual_information

# --------------------------------------------------------------------------- modules


class NCCLoss(nn.Module):
    """``1 - local_ncc(fixed, warped)`` (see :func:`local_ncc`)."""

    def __init__(
        self, window: int | Sequence[int] = 9, squared: bool = True, eps: float = 1e-5, structure: float = 0.0
    ):
        super().__init__()
        self.window, self.squared, self.eps, self.structure = window, squared, eps, structure

    def forward(self, fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> Tensor:
        return 1.0 - local_ncc(fixed, warped, self.window, self.squared, self.eps, mask, self.structure)


class MSELoss(nn.Module):
    """``mse(fixed, warped)`` (see :func:`mse`)."""

    def forward(self, fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> Tensor:
        return mse(fixed, warped, mask)


class MILoss(nn.Module):
    """``-mutual_information(fixed, warped)`` in nats (see :func:`mutual_information`)."""

    def __init__(self, bins: int = 32, sigma_ratio: float = 0.5, max_voxels: int | None = None, seed: int | None = 0):
        super().__init__()
        self.bins, self.sigma_ratio = bins, sigma_ratio
        self.max_voxels, self.seed = max_voxels, seed

    def forward(self, fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> Tensor:
        return -mutual_information(fixed, warped, self.bins, self.sigma_ratio, mask, self.max_voxels, self.seed)


class GradLoss(nn.Module):
    """``gradient_penalty(field, penalty)`` (see :func:`gradient_penalty`)."""

    def __init__(self, penalty: Penalty = "l2"):
        super().__init__()
        if penalty not in ("l1", "l2"):
            raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
        self.penalty = penalty

    def forward(self, field: Tensor) -> Tensor:
        return gradient_penalty(field, self.penalty)


class BendingLoss(nn.Module):
    """``bending_energy(field)`` (see :func:`bending_energy`)."""

    def forward(self, field: Tensor) -> Tensor:
        return bending_energy(field)


class DiceLoss(nn.Module):
    """``1 - dice(a, b)`` over one-hot/probability tensors (see :func:`dice`)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return 1.0 - dice(a, b, "mean", self.eps)


# --------------------------------------------------------------------------- registries

SIMILARITY_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ncc": NCCLoss,
    "mse": MSELoss,
    "mi": MILoss,
}

REGULARIZERS: dict[str, Callable[..., nn.Module]] = {
    "l2": lambda **kwargs: GradLoss("l2", **kwargs),
    "l1": lambda **kwargs: GradLoss("l1", **kwargs),
    "bending": BendingLoss,
}


def _lookup(registry: dict[str, Callable[..., nn.Module]], kind: str, name: str) -> Callable[..., nn.Module]:
    """Registry entry for ``name`` (case-insensitive) or a ValueError listing the choices."""
    key = str(name).strip().lower()
    if key not in registry:
        raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(registry))}")
    return registry[key]


def similarity_loss(name: str, **kwargs) -> nn.Module:
    """Similarity loss module by name: ``'ncc'``, ``'mse'`` or ``'mi'`` (kwargs go to it)."""
    return _lookup(SIMILARITY_LOSSES, "similarity", name)(**kwargs)


def regularizer(name: str, **kwargs) -> nn.Module:
    """Regulariser module by name: ``'l2'``, ``'l1'`` (gradient) or ``'bending'``."""
    return _lookup(REGULARIZERS, "regularizer", name)(**kwargs)
