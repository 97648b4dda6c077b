"""Losses: similarity (NCC, MSE, the one mutual information), regularisers, Dice.

Pure functions on ``(N, C, *spatial)`` tensors plus thin ``nn.Module``s selectable by name
(:func:`similarity_loss`, :func:`regularizer`).
"""

from voxreg.losses.similarity import (REGULARIZERS, SIMILARITY_LOSSES, BendingLoss, DiceLoss, GradLoss, MILoss, MSELoss, NCCLoss,
                                      bending_energy, box_filter, dice, entropy, global_ncc,
                                      gradient_penalty, joint_entropy, joint_histogram, local_ncc,
                                      local_ncc_map, mse, mutual_information, regularizer,
                                      similarity_loss)

__all__ = ["REGULARIZERS", "SIMILARITY_LOSSES", "BendingLoss", "DiceLoss", "GradLoss", "MILoss", "MSELoss", "NCCLoss", "bending_energy",
           "box_filter", "dice", "entropy", "global_ncc", "gradient_penalty", "joint_entropy",
           "joint_histogram", "local_ncc", "local_ncc_map", "mse", "mutual_information",
           "regularizer", "similarity_loss"]
