"""Evaluation measures: overlap (Dice per label, HD95), Jacobian (folding, SD log J),
field error and image similarity. Computed only when asked, never inside a registration."""

from voxreg.metrics.measures import dice_per_label, endpoint_error, jacobian_stats, similarities, similarity_report

__all__ = ["dice_per_label", "endpoint_error", "jacobian_stats", "similarities", "similarity_report"]
