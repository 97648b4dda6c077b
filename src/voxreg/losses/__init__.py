"""Losses: similarity (NCC, MSE, the one mutual information), regularisers, Dice.

Pure functions on ``(N, C, *spatial)`` tensors (:mod:`.similarity`, :mod:`.regularizers`,
:mod:`.overlap`) plus thin ``nn.Module``s selectable by name (:mod:`.modules`:
:func:`similarity_loss`, :func:`regularizer`).

Names are imported on first use (PEP 562), so importing the package stays cheap.
"""

from typing import TYPE_CHECKING

from voxreg._lazy import lazy_exports

if TYPE_CHECKING:
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
        mutual_information_many,
    )

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "REGULARIZERS": "voxreg.losses.modules",
        "SIMILARITY_LOSSES": "voxreg.losses.modules",
        "BendingLoss": "voxreg.losses.modules",
        "DiceLoss": "voxreg.losses.modules",
        "GradLoss": "voxreg.losses.modules",
        "MILoss": "voxreg.losses.modules",
        "MSELoss": "voxreg.losses.modules",
        "NCCLoss": "voxreg.losses.modules",
        "regularizer": "voxreg.losses.modules",
        "similarity_loss": "voxreg.losses.modules",
        "dice": "voxreg.losses.overlap",
        "bending_energy": "voxreg.losses.regularizers",
        "gradient_penalty": "voxreg.losses.regularizers",
        "FixedLocalNCC": "voxreg.losses.similarity",
        "box_filter": "voxreg.losses.similarity",
        "box_sum": "voxreg.losses.similarity",
        "entropy": "voxreg.losses.similarity",
        "global_ncc": "voxreg.losses.similarity",
        "joint_entropy": "voxreg.losses.similarity",
        "joint_histogram": "voxreg.losses.similarity",
        "local_ncc": "voxreg.losses.similarity",
        "local_ncc_map": "voxreg.losses.similarity",
        "mattes_mi": "voxreg.losses.similarity",
        "mse": "voxreg.losses.similarity",
        "mutual_information": "voxreg.losses.similarity",
        "mutual_information_many": "voxreg.losses.similarity",
    },
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
    "mutual_information_many",
    "regularizer",
    "similarity_loss",
]
