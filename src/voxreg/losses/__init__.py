"""Losses: similarity (NCC, MSE, the one mutual information), regularisers, Dice.

Pure functions on ``(N, C, *spatial)`` tensors (:mod:`.similarity`, :mod:`.regularizers`,
:mod:`.overlap`) plus thin ``nn.Module``s selectable by name (:mod:`.modules`:
:func:`similarity_loss`, :func:`regularizer`).
"""

from voxreg.losses.modules import (
    REGULARIZERS,
    SIMILARITY_LOSSES,
    BendingLoss,
    DiceLoss,
    GradLoss,
    MILoss,
    MSELoss,
    NCCLoss,
    regularizer,
    similarity_loss,
)
from voxreg.losses.overlap import dice
from voxreg.losses.regularizers import bending_energy, gradient_penalty
from voxreg.losses.similarity import (
    FixedLocalNCC,
    box_filter,
    box_sum,
    entropy,
    global_ncc,
    joint_entropy,
    joint_histogram,
    local_ncc,
    local_ncc_map,
    mattes_mi,
    mse,
    mutual_information,
)

__all__ = [
    "REGULARIZERS",
    "SIMILARITY_LOSSES",
    "BendingLoss",
    "DiceLoss",
    "GradLoss",
    "MILoss",
    "MSELoss",
    "NCCLoss",
    "bending_energy",
    "box_filter",
    "dice",
    "entropy",
    "global_ncc",
    "gradient_penalty",
    "joint_entropy",
    "joint_histogram",
    "local_ncc",
    "local_ncc_map",
    "FixedLocalNCC",
    "box_sum",
    "mattes_mi",
    "mse",
    "mutual_information",
    "regularizer",
    "similarity_loss",
]
