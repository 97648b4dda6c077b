"""Small quality-control thumbnails: edges of the fixed scan over the warped moving scan.

One mid-slice (the first plane of :func:`voxreg.viz.registration_figure.display_planes`: axial
for a 3D scan with a header, the only plane of a 2D one), shown in the same orientation as
``figure.png``, resampled to square millimetre pixels and encoded as a small PNG (Pillow, no
matplotlib figure). A well registered pair shows the fixed scan's edges (red) lying on the
warped scan's boundaries; a failed one shows them crossing unrelated anatomy.
"""

from __future__ import annotations

import io as _bytes_io
from collections.abc import Sequence

import numpy as np

from voxreg.core.errors import VoxregError
from voxreg.core.grid import voxel_spacing
from voxreg.viz.registration_figure import DisplayPlane, display_planes

__all__ = ["edge_mask", "edge_overlay_png", "mid_slice", "overlay_rgb"]

EDGE_COLOUR = (255, 40, 40)


def _display(array: np.ndarray, plane: DisplayPlane) -> np.ndarray:
    """The slice of ``plane`` as an image: rows top -> bottom, columns left -> right."""
    cut = array if plane.axis < 0 else np.take(array, plane.index, axis=plane.axis)
    in_plane = [d for d in range(array.ndim) if d != plane.axis]
    cut = cut if in_plane.index(plane.horizontal) == 0 else cut.T  # indexed [h, v]
    cut = cut[::-1] if plane.flip_h else cut
    cut = cut[:, ::-1] if plane.flip_v else cut
    return np.ascontiguousarray(cut.T[::-1])  # vertical axis up, as figure.png (origin='lower')


def mid_slice(array: np.ndarray, affine: np.ndarray | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """The displayed mid-slice of a 2D/3D ``array`` and its pixel size (row, column) in mm."""
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise VoxregError(f"thumbnail: expected a 2D or 3D array, got shape {array.shape}")
    plane = display_planes(array.shape, affine)[0]
    spacing = np.ones(array.ndim) if affine is None else voxel_spacing(np.asarray(affine), array.ndim)
    return _display(array, plane), (float(spacing[plane.vertical]), float(spacing[plane.horizontal]))


def _unit(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """``image`` scaled to [0, 1] between its ``low`` and ``high`` percentiles."""
    image = np.nan_to_num(np.asarray(image, dtype=np.float32))
    lo, hi = np.percentile(image, [low, high])
    return np.clip((image - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)


def edge_mask(image: np.ndarray, fraction: float = 0.12) -> np.ndarray:
    """Boolean edges of a 2D ``image``: gradient magnitude (of the percentile-scaled image)
    in the top ``fraction`` of the non-flat pixels."""
    if image.ndim != 2 or min(image.shape) < 2:
        raise VoxregError(f"thumbnail: edges need a 2D slice of at least 2x2 pixels, got shape {image.shape}")
    magnitude = np.hypot(*np.gradient(_unit(image)))
    moving = magnitude[magnitude > 1e-3]
    if moving.size == 0:
        return np.zeros(image.shape, bool)
    return magnitude >= max(float(np.quantile(moving, 1.0 - fraction)), 0.02)


def overlay_rgb(fixed_slice: np.ndarray, warped_slice: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8: the warped slice in grey with the fixed slice's edges in red."""
    if fixed_slice.shape != warped_slice.shape:
        raise VoxregError(f"thumbnail: fixed slice {fixed_slice.shape} and warped slice {warped_slice.shape} differ")
    grey = np.round(_unit(warped_slice) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[edge_mask(fixed_slice)] = EDGE_COLOUR
    return rgb


def _resized(rgb: np.ndarray, pixel_mm: Sequence[float], size: int) -> np.ndarray:
    """``rgb`` resampled to square millimetre pixels, its longer side ``size`` pixels."""
    from PIL import Image as PilImage

    height_mm, width_mm = rgb.shape[0] * pixel_mm[0], rgb.shape[1] * pixel_mm[1]
    scale = size / max(height_mm, width_mm)
    shape = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    return np.asarray(PilImage.fromarray(rgb).resize(shape, PilImage.Resampling.NEAREST))


def edge_overlay_png(fixed: np.ndarray, warped: np.ndarray, affine: np.ndarray | None = None, size: int = 160) -> bytes:
    """PNG bytes of a ``size``-pixel thumbnail: the mid-slice of ``warped`` (the moving scan
    on the fixed grid) with the edges of ``fixed`` over it; ``affine`` (the fixed scan's)
    orients the slice and sets the pixel aspect."""
    from PIL import Image as PilImage

    if np.shape(fixed) != np.shape(warped):
        raise VoxregError(f"thumbnail: fixed {np.shape(fixed)} and warped {np.shape(warped)} must share one grid")
    fixed_slice, pixel_mm = mid_slice(fixed, affine)
    warped_slice, _ = mid_slice(warped, affine)
    rgb = _resized(overlay_rgb(fixed_slice, warped_slice), pixel_mm, size)
    buffer = _bytes_io.BytesIO()
    PilImage.fromarray(rgb).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
