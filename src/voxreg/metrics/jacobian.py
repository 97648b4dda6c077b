"""Field regularity and field error: Jacobian statistics (folding, SD of log J) and the
endpoint error between two displacement fields (voxels of the fixed grid)."""

from __future__ import annotations

import math

import numpy as np
import torch

from voxreg.core.spatial import jacobian_determinant_slabs, vector_length
from voxreg.metrics._arrays import ArrayLike, as_field, spatial_mask

_LOG_JAC_CLIP = (1e-9, 1e9)  # as Learn2Reg, without its "+3" offset


def jacobian_stats(field: ArrayLike, mask: ArrayLike | None = None) -> dict[str, float]:
    """Regularity of a displacement field from its Jacobian determinant (central differences).

    Returns ``folding_percent`` (% voxels with det <= 0), ``log_jacobian_std`` (std of
    ``log(clip(det, 1e-9, 1e9))``, as Learn2Reg), ``jacobian_min``, ``jacobian_max`` and
    ``jacobian_mean``, over the voxels of ``mask`` when given. The determinant is streamed
    slab by slab (:func:`voxreg.core.spatial.jacobian_determinant_slabs`) into float64
    statistics (the standard deviation by Chan et al.'s pairwise update), so neither the
    whole determinant nor a float64 copy of it is ever held (a 1 mm brain's field: 0.60 ->
    0.26 s on a process's first call, 0.20 -> 0.19 s warm).
    """
    tensor = as_field(field)
    mask_t = spatial_mask(mask, tuple(tensor.shape[2:]))
    selected = None if mask_t is None else torch.from_numpy(mask_t)
    stats = _RunningStats()
    with torch.no_grad():
        for start, stop, det in jacobian_determinant_slabs(tensor):
            values = det[0].reshape(-1) if selected is None else det[0][selected[start:stop].to(det.device)]
            stats.add(values.double())
    if stats.count == 0:
        raise ValueError("mask selects no voxels")
    return stats.summary()


class _RunningStats:
    """Float64 statistics of determinant values added chunk by chunk (Chan et al.'s update)."""

    def __init__(self) -> None:
        self.count = self.folded = 0
        self.total = self.log_mean = self.log_m2 = 0.0
        self.low, self.high = math.inf, -math.inf

    def add(self, chunk: torch.Tensor) -> None:
        """Fold a float64 chunk of determinant values into the statistics."""
        n = int(chunk.numel())
        if n == 0:
            return
        log_det = chunk.clamp(*_LOG_JAC_CLIP).log_()
        mean = float(log_det.mean())
        m2 = float(log_det.sub_(mean).square_().sum())
        delta = mean - self.log_mean
        self.log_m2 += m2 + delta * delta * self.count * n / (self.count + n)
        self.log_mean += delta * n / (self.count + n)
        self.count += n
        self.folded += int(torch.count_nonzero(chunk <= 0))
        self.total += float(chunk.sum())
        self.low, self.high = min(self.low, float(chunk.min())), max(self.high, float(chunk.max()))

    def summary(self) -> dict[str, float]:
        """The statistics :func:`jacobian_stats` returns."""
        return {
            "folding_percent": float(100.0 * self.folded / self.count),
            "log_jacobian_std": float(math.sqrt(self.log_m2 / self.count)),
            "jacobian_min": self.low,
            "jacobian_max": self.high,
            "jacobian_mean": self.total / self.count,
        }


def endpoint_error(field_a: ArrayLike, field_b: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Mean Euclidean distance in voxels between two displacement fields (over ``mask``)."""
    a, b = as_field(field_a), as_field(field_b)
    if a.shape != b.shape:
        raise ValueError(f"fields differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    dist = vector_length(a - b, dim=1)[0].cpu().numpy()
    mask = spatial_mask(mask, dist.shape)
    values = dist if mask is None else dist[mask]
    if values.size == 0:
        raise ValueError("mask selects no voxels")
    return float(values.mean())


def mean_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Euclidean distance between corresponding rows of two ``(n, 3)`` point arrays
    (target registration error in the points' unit)."""
    return float(np.mean(np.linalg.norm(np.asarray(a) - np.asarray(b), axis=1)))
