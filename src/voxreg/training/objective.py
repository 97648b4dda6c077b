"""The training objective (moving ``M``, fixed ``F``, predicted displacement ``u``)::

    similarity(F, warp(M, u)) + lambda * regularizer(u) [+ dice_weight * DiceLoss(labels)]

``lambda`` is fixed (``TrainConfig.lam``) or, for a lambda-conditional network, drawn
log-uniformly per sample (:func:`sample_lambda`)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from voxreg.core import spatial
from voxreg.losses import DiceLoss, regularizer, similarity_loss
from voxreg.training.config import TrainConfig

__all__ = ["Objective", "label_dice", "one_hot", "sample_lambda"]


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """``(N, 1, *S)`` int labels -> ``(N, K, *S)`` float one-hot."""
    return F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).float()


def label_dice(fixed: Tensor, warped: Tensor) -> float:
    """Mean Dice over the non-zero labels present in ``fixed`` (``(1, 1, *S)`` int tensors)."""
    scores = []
    for k in torch.unique(fixed).tolist():
        if k == 0:
            continue
        a, b = fixed == k, warped == k
        scores.append(2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0))
    return float(np.mean(scores)) if scores else float("nan")


class Objective:
    """The training loss ``similarity + lambda * regularizer [+ dice_weight * Dice]``;
    calling it returns ``(total, similarity, regularizer)``."""

    def __init__(self, config: TrainConfig, num_classes: int) -> None:
        kwargs = {"window": config.window} if config.similarity == "ncc" else {}
        self.similarity = similarity_loss(config.similarity, **kwargs)
        self.regularizer = regularizer(config.regularizer)
        self.dice = DiceLoss()
        self.dice_weight = config.dice_weight if num_classes > 1 else 0.0
        self.num_classes = num_classes
        self.similarity_weight = float(config.similarity_weight)

    def __call__(
        self,
        moving: Tensor,
        fixed: Tensor,
        field_: Tensor,
        lam: Tensor,
        labels: tuple[Tensor, Tensor, Tensor] | None = None,
        inverse: Tensor | None = None,
        network_field: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Loss of one batch; ``inverse`` (bidirectional) also scores ``fixed`` warped back;
        ``network_field`` (on the network's coarser grid) is the one regularised when given."""
        if self.similarity_weight > 0:
            sim = self.similarity(fixed, spatial.warp(moving, field_))
            if inverse is not None:  # bidirectional: fixed warped back onto moving, weights 1/2 each
                sim = 0.5 * (sim + self.similarity(moving, spatial.warp(fixed, inverse)))
        else:  # label-only (synthetic) training: no image similarity at all
            sim = field_.new_zeros(())
        smooth = field_ if network_field is None else network_field
        regs = torch.stack([self.regularizer(smooth[i : i + 1]) for i in range(smooth.shape[0])])
        reg_term = (lam.to(regs) * regs).mean()
        total = self.similarity_weight * sim + reg_term
        if labels is not None and self.dice_weight > 0:
            mov_lab, fix_lab, both = labels
            if bool(both.any()):
                warped = spatial.warp(one_hot(mov_lab[both], self.num_classes), field_[both])
                target = one_hot(fix_lab[both], self.num_classes)
                total = total + self.dice_weight * self.dice(target[:, 1:], warped[:, 1:])
        return total, sim, regs.mean()


def sample_lambda(config: TrainConfig, n: int, generator: torch.Generator) -> Tensor:
    """Lambda per sample: ``config.lam``, or log-uniform in ``config.lam_range``."""
    if config.lam_range is None:
        return torch.full((n,), float(config.lam))
    low, high = (math.log(v) for v in config.lam_range)
    return torch.exp(torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low).float()
