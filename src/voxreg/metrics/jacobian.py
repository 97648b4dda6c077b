"""Field regularity and field error: Jacobian statistics (folding, SD of log J) and the
endpoint error between two displacement fields (voxels of the fixed grid)."""

from __future__ import annotations

import numpy as np
import torch

from voxreg.core.spatial import jacobian_determinant
from voxreg.metrics._arrays import ArrayLike, as_field, spatial_mask

_LOG_JAC_CLIP = (1e-9, 1e9)  # as Learn2Reg, without its "+3" offset


#: voxels of the determinant turned into float64 statistics at a time (memory bound)
_STATS_CHUNK = 1 << 22


def jacobian_stats(field: ArrayLike, mask: ArrayLike | None = None) -> dict[str, float]:
    """Regularity of a displacement field from its Jacobian determinant (central differences).

    Returns ``folding_percent`` (% voxels with det <= 0), ``log_jacobian_std`` (std of
    ``log(clip(det, 1e-9, 1e9))``, as Learn2Reg), ``jacobian_min``, ``jacobian_max`` and
    ``jacobian_mean``, over the voxels of ``mask`` when given. The statistics are gathered
    chunk by chunk in float64 (the standard deviation by Chan et al.'s pairwise update), so
    their memory does not grow with the field.
    """
    tensor = as_field(field)
    det = jacobian_determinant(tensor)[0].cpu().numpy()
    mask = spatial_mask(mask, det.shape)
    values = det.reshape(-1) if mask is None else det[mask]
    if values.size == 0:
        raise ValueError("mask selects no voxels")
    count = folded = 0
    total = log_mean = log_m2 = 0.0
    low, high = np.inf, -np.inf
    for start in range(0, values.size, _STATS_CHUNK):
        chunk = values[start : start + _STATS_CHUNK].astype(np.float64)
        log_det = np.log(np.clip(chunk, *_LOG_JAC_CLIP))
        n, mean = chunk.size, float(log_det.mean())
        m2 = float(np.square(log_det - mean).sum())
        delta = mean - log_mean
        log_m2 += m2 + delta * delta * count * n / (count + n)
        log_mean += delta * n / (count + n)
        count += n
        folded += int(np.count_nonzero(chunk <= 0))
        total += float(chunk.sum())
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    return {
        "folding_percent": float(100.0 * folded / count),
        "log_jacobian_std": float(np.sqrt(log_m2 / count)),
        "jacobian_min": low,
        "jacobian_max": high,
        "jacobian_mean": total / count,
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
