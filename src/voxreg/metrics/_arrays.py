"""Array conversions shared by the metrics: numpy views of tensors, fields and images in
the layouts of :mod:`voxreg.core.spatial` (``(1, ndim, *S)`` fields, ``(N, C, *S)`` images)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ArrayLike = np.ndarray | Tensor


def as_numpy(array: ArrayLike) -> np.ndarray:
    """A numpy view/copy of an array or tensor."""
    return array.detach().cpu().numpy() if isinstance(array, Tensor) else np.asarray(array)


def as_field(field: ArrayLike) -> Tensor:
    """A float32 ``(1, ndim, *S)`` tensor from a ``(1, ndim, *S)`` or ``(ndim, *S)`` field."""
    tensor = torch.as_tensor(as_numpy(field) if not isinstance(field, Tensor) else field.detach())
    tensor = tensor.to(torch.float32)
    if tensor.dim() in (3, 4) and tensor.shape[0] == tensor.dim() - 1:
        tensor = tensor[None]
    if tensor.dim() not in (4, 5) or tensor.shape[0] != 1 or tensor.shape[1] != tensor.dim() - 2:
        raise ValueError(f"expected a field of shape (1, ndim, *S) or (ndim, *S), got {tuple(tensor.shape)}")
    return tensor


def spatial_mask(mask: ArrayLike | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """A boolean mask of spatial ``shape`` (leading singleton axes dropped)."""
    if mask is None:
        return None
    mask = as_numpy(mask).astype(bool)
    while mask.ndim > len(shape) and mask.shape[0] == 1:
        mask = mask[0]
    if mask.shape != shape:
        raise ValueError(f"mask of shape {mask.shape} does not match the field's grid {shape}")
    return mask


def as_image(image: ArrayLike) -> Tensor:
    """A float32 ``(N, C, *S)`` tensor from a spatial array ``(*S)`` or a 4D/5D tensor."""
    tensor = image.detach() if isinstance(image, Tensor) else torch.as_tensor(np.asarray(image))
    tensor = tensor.to(torch.float32)
    if tensor.dim() in (2, 3):
        tensor = tensor[None, None]
    if tensor.dim() not in (4, 5):
        raise ValueError(f"expected a 2D/3D image or an (N, C, *S) tensor, got {tuple(tensor.shape)}")
    return tensor
