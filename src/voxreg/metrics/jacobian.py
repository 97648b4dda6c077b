"""Field regularity and field error: Jacobian statistics (folding, SD of log J) and the
endpoint error between two displacement fields (voxels of the fixed grid)."""

from __future__ import annotations

import numpy as np
import torch

from voxreg.core.spatial import jacobian_determinant
from voxreg.metrics._arrays import ArrayLike, as_field, spatial_mask

_LOG_JAC_CLIP = (1e-9, 1e9)  # as Learn2Reg, without its "+3" offset


def jacobian_stats(field: ArrayLike, mask: ArrayLike | None = None) -> dict[str, float]:
    """Regularity of a displacement field from its Jacobian determinant (central differences).

    Returns ``folding_percent`` (% voxels with det <= 0), ``log_jacobian_std`` (std of
    ``log(clip(det, 1e-9, 1e9))``, as Learn2Reg), ``jacobian_min``, ``jacobian_max`` and
    ``jacobian_mean``, over the voxels of ``mask`` when given.
    """
    tensor = as_field(field)
    det = jacobian_determinant(tensor)[0].cpu().numpy().astype(np.float64)
    mask = spatial_mask(mask, det.shape)
    values = det.ravel() if mask is None else det[mask]
    if values.size == 0:
        raise ValueError("mask selects no voxels")
    log_det = np.log(np.clip(values, *_LOG_JAC_CLIP))
    return {
        "folding_percent": float(100.0 * np.mean(values <= 0)),
        "log_jacobian_std": float(np.std(log_det)),
        "jacobian_min": float(values.min()),
        "jacobian_max": float(values.max()),
        "jacobian_mean": float(values.mean()),
    }


def endpoint_error(field_a: ArrayLike, field_b: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Mean Euclidean distance in voxels between two displacement fields (over ``mask``)."""
    a, b = as_field(field_a), as_field(field_b)
    if a.shape != b.shape:
        raise ValueError(f"fields differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    dist = torch.linalg.vector_norm(a - b, dim=1)[0].cpu().numpy()
    mask = spatial_mask(mask, dist.shape)
    values = dist if mask is None else dist[mask]
    if values.size == 0:
        raise ValueError("mask selects no voxels")
    return float(values.mean())


def mean_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Euclidean distance between corresponding rows of two ``(n, 3)`` point arrays
    (target registration error in the points' unit)."""
    return float(np.mean(np.linalg.norm(np.asarray(a) - np.asarray(b), axis=1)))
