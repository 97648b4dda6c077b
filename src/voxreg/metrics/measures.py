"""Evaluation metrics (not losses): label overlap, field regularity, image similarity.

Inputs may be numpy arrays or tensors; outputs are plain Python floats/dicts, ready for
``metrics.json``. Images are spatial arrays ``(*S)`` or tensors ``(N, C, *S)``; fields are
``(1, ndim, *S)`` or ``(ndim, *S)`` displacements in voxels (see :mod:`voxreg.core.spatial`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from voxreg import losses
from voxreg.core.spatial import jacobian_determinant

ArrayLike = np.ndarray | Tensor

_LOG_JAC_CLIP = (1e-9, 1e9)  # as Learn2Reg, without its "+3" offset


# --------------------------------------------------------------------------- Dice


def _as_numpy(array: ArrayLike) -> np.ndarray:
    """A numpy view/copy of an array or tensor."""
    return array.detach().cpu().numpy() if isinstance(array, Tensor) else np.asarray(array)


def _compact_labels(fixed: np.ndarray, warped: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map both label arrays (flattened) to indices ``0..K-1``; return them and the K labels."""
    if np.issubdtype(fixed.dtype, np.floating) or np.issubdtype(warped.dtype, np.floating):
        fixed, warped = np.rint(fixed).astype(np.int64), np.rint(warped).astype(np.int64)
    fixed, warped = fixed.ravel(), warped.ravel()
    low = min(int(fixed.min()), int(warped.min()))
    high = max(int(fixed.max()), int(warped.max()))
    if low >= 0 and high < 1 << 24:  # small non-negative labels: index by value directly
        return fixed.astype(np.intp, copy=False), warped.astype(np.intp, copy=False), np.arange(high + 1)
    values, inverse = np.unique(np.concatenate([fixed, warped]), return_inverse=True)
    return inverse[: fixed.size], inverse[fixed.size:], values


def dice_per_label(fixed_labels: ArrayLike, warped_labels: ArrayLike,
                   labels: Sequence[int] | None = None) -> dict[int, float]:
    """Dice ``2|F=l & W=l| / (|F=l| + |W=l|)`` for each label ``l``.

    ``labels`` defaults to the labels present in both maps, excluding 0 (background).
    A requested label absent from both maps gives NaN. Counts come from three
    ``np.bincount`` calls (no loop over voxels).
    """
    fixed, warped = _as_numpy(fixed_labels), _as_numpy(warped_labels)
    if fixed.shape != warped.shape:
        raise ValueError(f"label maps differ in shape: {fixed.shape} vs {warped.shape}")
    if fixed.size == 0:
        return {}
    index_f, index_w, values = _compact_labels(fixed, warped)
    k = values.size
    count_f = np.bincount(index_f, minlength=k)
    count_w = np.bincount(index_w, minlength=k)
    overlap = np.bincount(index_f[index_f == index_w], minlength=k)
    if labels is None:
        present = (count_f > 0) & (count_w > 0) & (values != 0)
        labels = values[present].tolist()
    result = {}
    for label in labels:
        i = int(np.searchsorted(values, label))  # values are sorted
        found = i < k and values[i] == label
        total = count_f[i] + count_w[i] if found else 0
        result[int(label)] = float(2.0 * overlap[i] / total) if total > 0 else float("nan")
    return result


# --------------------------------------------------------------------------- Jacobian


def _as_field(field: ArrayLike) -> Tensor:
    """A float32 ``(1, ndim, *S)`` tensor from a ``(1, ndim, *S)`` or ``(ndim, *S)`` field."""
    tensor = torch.as_tensor(_as_numpy(field) if not isinstance(field, Tensor) else field.detach())
    tensor = tensor.to(torch.float32)
    if tensor.dim() in (3, 4) and tensor.shape[0] == tensor.dim() - 1:
        tensor = tensor[None]
    if tensor.dim() not in (4, 5) or tensor.shape[0] != 1 or tensor.shape[1] != tensor.dim() - 2:
        raise ValueError(f"expected a field of shape (1, ndim, *S) or (ndim, *S), got {tuple(tensor.shape)}")
    return tensor


def _spatial_mask(mask: ArrayLike | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """A boolean mask of spatial ``shape`` (leading singleton axes dropped)."""
    if mask is None:
        return None
    mask = _as_numpy(mask).astype(bool)
    while mask.ndim > len(shape) and mask.shape[0] == 1:
        mask = mask[0]
    if mask.shape != shape:
        raise ValueError(f"mask of shape {mask.shape} does not match the field's grid {shape}")
    return mask


def jacobian_stats(field: ArrayLike, mask: ArrayLike | None = None) -> dict[str, float]:
    """Regularity of a displacement field from its Jacobian determinant (central differences).

    Returns ``folding_percent`` (% voxels with det <= 0), ``log_jacobian_std`` (std of
    ``log(clip(det, 1e-9, 1e9))``, as Learn2Reg), ``jacobian_min``, ``jacobian_max`` and
    ``jacobian_mean``, over the voxels of ``mask`` when given.
    """
    tensor = _as_field(field)
    det = jacobian_determinant(tensor)[0].cpu().numpy().astype(np.float64)
    mask = _spatial_mask(mask, det.shape)
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


# --------------------------------------------------------------------------- fields


def endpoint_error(field_a: ArrayLike, field_b: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Mean Euclidean distance in voxels between two displacement fields (over ``mask``)."""
    a, b = _as_field(field_a), _as_field(field_b)
    if a.shape != b.shape:
        raise ValueError(f"fields differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    dist = torch.linalg.vector_norm(a - b, dim=1)[0].cpu().numpy()
    mask = _spatial_mask(mask, dist.shape)
    values = dist if mask is None else dist[mask]
    if values.size == 0:
        raise ValueError("mask selects no voxels")
    return float(values.mean())


# --------------------------------------------------------------------------- similarity


def _as_image(image: ArrayLike) -> Tensor:
    """A float32 ``(N, C, *S)`` tensor from a spatial array ``(*S)`` or a 4D/5D tensor."""
    tensor = image.detach() if isinstance(image, Tensor) else torch.as_tensor(np.asarray(image))
    tensor = tensor.to(torch.float32)
    if tensor.dim() in (2, 3):
        tensor = tensor[None, None]
    if tensor.dim() not in (4, 5):
        raise ValueError(f"expected a 2D/3D image or an (N, C, *S) tensor, got {tuple(tensor.shape)}")
    return tensor


def similarities(fixed: ArrayLike, other: ArrayLike, window: int = 9, bins: int = 32,
                 max_voxels: int | None = 1 << 20) -> dict[str, float]:
    """Global NCC, local NCC (squared, ``window``), MI (nats) and MSE between two images
    on one grid (MI expects intensities in [0, 1])."""
    fixed, other = _as_image(fixed), _as_image(other)
    with torch.no_grad():
        return _similarity_values(fixed, other, window, bins, max_voxels)


def _similarity_values(fixed: Tensor, other: Tensor, window: int, bins: int,
                       max_voxels: int | None) -> dict[str, float]:
    return {
        "ncc": float(losses.global_ncc(fixed, other)),
        "local_ncc": float(losses.local_ncc(fixed, other, window)),
        "mi": float(losses.mutual_information(fixed, other, bins, max_voxels=max_voxels)),
        "mse": float(losses.mse(fixed, other)),
    }


def similarity_report(fixed: ArrayLike, moving: ArrayLike, warped: ArrayLike, window: int = 9,
                      bins: int = 32, max_voxels: int | None = 1 << 20) -> dict[str, float]:
    """Similarity of fixed vs moving (``*_before``) and fixed vs warped (``*_after``).

    Keys: ``ncc`` (global Pearson), ``local_ncc`` (squared, ``window``), ``mi`` (nats,
    ``bins``, on at most ``max_voxels`` voxels with a fixed seed) and ``mse``, each with
    the suffix ``_before`` / ``_after``. ``moving`` must already be on the fixed grid;
    MI expects intensities in [0, 1].
    """
    f, m, w = _as_image(fixed), _as_image(moving), _as_image(warped)
    if not f.shape == m.shape == w.shape:
        raise ValueError(f"fixed, moving and warped differ in shape: {tuple(f.shape)}, "
                         f"{tuple(m.shape)}, {tuple(w.shape)}")
    with torch.no_grad():
        before = _similarity_values(f, m, window, bins, max_voxels)
        after = _similarity_values(f, w, window, bins, max_voxels)
    report = {f"{k}_before": v for k, v in before.items()}
    report.update({f"{k}_after": v for k, v in after.items()})
    return report
