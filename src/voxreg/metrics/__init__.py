"""Evaluation measures: overlap (Dice per label, HD95 per structure), Jacobian (folding,
SD log J), field and landmark error, and image similarity. Computed only when asked, never
inside a registration."""

from voxreg.metrics.jacobian import endpoint_error, jacobian_stats, mean_distance
from voxreg.metrics.overlap import common_labels, dice_per_label, hd95, structure_scores
from voxreg.metrics.similarity import global_similarity, similarities, similarity_report

__all__ = [
    "common_labels",
    "dice_per_label",
    "endpoint_error",
    "global_similarity",
    "hd95",
    "jacobian_stats",
    "mean_distance",
    "similarities",
    "similarity_report",
    "structure_scores",
]
