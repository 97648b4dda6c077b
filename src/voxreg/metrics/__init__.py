"""Evaluation measures: overlap (Dice per label, HD95 per structure), Jacobian (folding,
SD log J), field and landmark error, and image similarity. Computed only when asked, never
inside a registration.

Names are imported on first use (PEP 562), so importing the package stays cheap.
"""

from typing import TYPE_CHECKING

from voxreg._lazy import lazy_exports

if TYPE_CHECKING:
    from voxreg.metrics.jacobian import endpoint_error, jacobian_stats, mean_distance
    from voxreg.metrics.overlap import common_labels, dice_per_label, dice_per_label_many, hd95, structure_scores
    from voxreg.metrics.similarity import global_similarity, similarities, similarity_report

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "endpoint_error": "voxreg.metrics.jacobian",
        "jacobian_stats": "voxreg.metrics.jacobian",
        "mean_distance": "voxreg.metrics.jacobian",
        "common_labels": "voxreg.metrics.overlap",
        "dice_per_label": "voxreg.metrics.overlap",
        "dice_per_label_many": "voxreg.metrics.overlap",
        "hd95": "voxreg.metrics.overlap",
        "structure_scores": "voxreg.metrics.overlap",
        "global_similarity": "voxreg.metrics.similarity",
        "similarities": "voxreg.metrics.similarity",
        "similarity_report": "voxreg.metrics.similarity",
    },
)

__all__ = [
    "common_labels",
    "dice_per_label",
    "dice_per_label_many",
    "endpoint_error",
    "global_similarity",
    "hd95",
    "jacobian_stats",
    "mean_distance",
    "similarities",
    "similarity_report",
    "structure_scores",
]
