"""Quick-look registration figure (PNG): fixed | moving | warped | difference | deformation.

Display convention (one rule for every panel and every image):

- 3D: one row per orthogonal mid-slice (through the array centre); 2D: one row.
- In each panel the in-plane array axis ``a`` runs horizontally (left -> right) and
  ``b`` vertically (bottom -> top), ``a < b``; i.e. the slice is shown transposed with
  ``origin='lower'``, so an RAS array (axis 0 = R, 1 = A, 2 = S) appears in anatomical
  *neurological* orientation (patient right on screen right, superior/anterior up).
- With ``affine`` given, the rows are named axial/coronal/sagittal and the panel axes are
  swapped/inverted so that any orientation (e.g. LIA) is shown the same way; without it
  the array is assumed to be RAS-like.
- Pixel aspect follows the voxel spacing. Grid lines are fixed-grid points ``x`` drawn at
  ``x + u(x)`` (in-plane components only), i.e. where each fixed voxel samples the moving
  image, over the Jacobian determinant of the full field (blue < 1 < red, <= 0 folding).

The figure is drawn fast: all panels are composed into one RGB mosaic (numpy, colormap
lookup tables, nearest-neighbour resampling to square millimetre pixels); the grid lines
(anti-aliased by drawing them at 4x and averaging) and the text (FreeType, matplotlib's
DejaVu Sans) are drawn over it with Pillow, which encodes the PNG. Matplotlib is not
imported (its import and first draw cost ~0.4 s of a fresh process): the colormaps are
its lookup tables (:mod:`voxreg.viz._colormaps`) and the colour-bar ticks its
``MaxNLocator(5)`` choice (:func:`nice_ticks`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voxreg.core.errors import VoxregError
from voxreg.core.grid import voxel_spacing
from voxreg.io.files import atomic_write

_COLUMNS = ("fixed", "moving (fixed grid)", "warped", "warped - fixed", "deformation grid")


@dataclass(frozen=True)
class DisplayPlane:
    """One displayed slice: the array axis cut at ``index`` and the in-plane axes."""

    axis: int
    index: int
    horizontal: int
    vertical: int
    flip_h: bool = False
    flip_v: bool = False
    name: str = ""


def _as_numpy_field(field: np.ndarray | torch.Tensor, ndim: int) -> np.ndarray:
    if isinstance(field, torch.Tensor):
        field = field.detach().cpu().numpy()
    field = np.asarray(field, dtype=np.float32)
    if field.ndim == ndim + 2 and field.shape[0] == 1:
        field = field[0]
    return field


def _check_inputs(fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, field: np.ndarray) -> None:
    if fixed.ndim not in (2, 3):
        raise VoxregError(f"figure: fixed must be a 2D or 3D array, got shape {fixed.shape}")
    for name, arr in (("moving", moving), ("warped", warped)):
        if arr.shape != fixed.shape:
            raise VoxregError(
                f"figure: {name} shape {arr.shape} differs from fixed {fixed.shape} "
                "(resample it onto the fixed grid first)"
            )
    if field.shape != (fixed.ndim, *fixed.shape):
        raise VoxregError(f"figure: field shape {field.shape} must be {(fixed.ndim, *fixed.shape)}")


# --------------------------------------------------------------------------- geometry


def _anatomical_axes(affine: np.ndarray | None, ndim: int) -> tuple[str, ...]:
    """Direction each array axis points to, as RAS letters ('R', 'A', 'S' or 'L', 'P', 'I')."""
    if affine is None or ndim == 2:
        return ("R", "A", "S")[:ndim]
    import nibabel as nib

    return tuple(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def display_planes(shape: Sequence[int], affine: np.ndarray | None = None) -> list[DisplayPlane]:
    """Planes to draw: for 3D the axial, coronal and sagittal mid-slices (in that order),
    for 2D the single plane; see the module docstring for the display convention."""
    if len(shape) == 2:
        return [DisplayPlane(axis=-1, index=0, horizontal=0, vertical=1, name="")]
    codes = _anatomical_axes(affine, 3)
    pair = {"R": "LR", "L": "LR", "A": "PA", "P": "PA", "S": "IS", "I": "IS"}
    axis_of = {pair[c]: i for i, c in enumerate(codes)}
    # (plane name, cut direction, horizontal direction, vertical direction)
    layout = (("axial", "IS", "LR", "PA"), ("coronal", "PA", "LR", "IS"), ("sagittal", "LR", "PA", "IS"))
    planes = []
    for name, cut, horiz, vert in layout:
        h, v, c = axis_of[horiz], axis_of[vert], axis_of[cut]
        planes.append(
            DisplayPlane(
                axis=c,
                index=shape[c] // 2,
                horizontal=h,
                vertical=v,
                flip_h=codes[h] in "LPI",
                flip_v=codes[v] in "LPI",
                name=f"{name} (axis {c} = {shape[c] // 2})",
            )
        )
    return planes


def _cut(array: np.ndarray, plane: DisplayPlane) -> np.ndarray:
    """2D slice indexed ``[h, v]`` (horizontal axis first)."""
    # basic indexing (a view): np.take would first copy a non-C-contiguous volume (nibabel's
    # Fortran-ordered arrays) in full
    sl = array if plane.axis < 0 else array[(slice(None),) * plane.axis + (plane.index,)]
    in_plane = [d for d in range(array.ndim) if d != plane.axis]
    return sl if in_plane.index(plane.horizontal) == 0 else sl.T


def grid_lines(disp_h: np.ndarray, disp_v: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Deformed grid lines of an in-plane displacement, in (h, v) pixel coordinates.

    ``disp_h``/``disp_v`` ``(H, V)`` are the displacements along the horizontal and
    vertical axes. Returns ``(along_h, along_v)``: ``along_h[k]`` ``(H, 2)`` is the line
    of fixed points ``(i, k*step)`` moved to ``(i + disp_h, k*step + disp_v)``; ``along_v[k]``
    ``(V, 2)`` likewise for the points ``(k*step, j)``. A zero field gives straight lines.
    """
    size_h, size_v = disp_h.shape
    hh, vv = np.meshgrid(np.arange(size_h, dtype=np.float32), np.arange(size_v, dtype=np.float32), indexing="ij")
    moved = np.stack([hh + disp_h, vv + disp_v], axis=-1)  # (H, V, 2)
    along_h = moved[:, ::step].transpose(1, 0, 2)  # lines at fixed v: (n, H, 2)
    along_v = moved[::step, :]  # lines at fixed h: (n, V, 2)
    return along_h, along_v


def _jacobian_slice(field: np.ndarray, plane: DisplayPlane) -> np.ndarray:
    """Jacobian determinant of ``x -> x + field(x)`` on the displayed slice, indexed ``[h, v]``:
    the values of :func:`voxreg.core.spatial.jacobian_determinant` (central differences,
    one-sided at the borders) from the slice and its two neighbours only."""
    ndim = field.shape[0]
    if plane.axis < 0:
        centre, across = field, None
    else:
        size = field.shape[1 + plane.axis]

        def take(i: int) -> np.ndarray:
            return field[(slice(None),) * (1 + plane.axis) + (i,)]

        centre = take(plane.index)
        if size < 2:
            across = np.zeros_like(centre)
        elif plane.index == 0:
            across = take(1) - take(0)
        elif plane.index == size - 1:
            across = take(size - 1) - take(size - 2)
        else:
            across = 0.5 * (take(plane.index + 1) - take(plane.index - 1))
    in_plane = [d for d in range(ndim) if d != plane.axis]
    # jac[c][k] = d(x + u)_c / d x_k
    jac = [[None] * ndim for _ in range(ndim)]
    for c in range(ndim):
        grads = np.gradient(centre[c])
        for j, k in enumerate(in_plane):
            jac[c][k] = grads[j]
        if across is not None:
            jac[c][plane.axis] = across[c]
        jac[c][c] = jac[c][c] + 1.0
    if ndim == 2:
        det = jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    else:
        (a, b, c), (d, e, f), (g, h, i) = jac
        det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    return det if in_plane.index(plane.horizontal) == 0 else det.T


# --------------------------------------------------------------------------- drawing


def show_slice(ax, image: np.ndarray | None, plane: DisplayPlane, aspect: float, **kwargs):
    """imshow of an ``[h, v]`` slice with the display convention (``None``: axes only, e.g.
    to draw contours on); returns the artist."""
    artist = None
    if image is not None:
        artist = ax.imshow(image.T, origin="lower", aspect=aspect, interpolation="nearest", **kwargs)
    ax.set_aspect(aspect)
    if plane.flip_h:
        ax.invert_xaxis()
    if plane.flip_v:
        ax.invert_yaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    return artist


def robust_range(arrays: Sequence[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([a.ravel() for a in arrays])
    lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1.0)


# --------------------------------------------------------------------------- mosaic
#
# The whole figure is one RGB raster (every panel resampled, nearest neighbour, to square
# millimetre pixels and coloured through a colormap lookup table), placed unresampled on one
# matplotlib Figure (``figimage``, no Axes); only the deformed grid lines (one LineCollection
# per row, clipped to its panel) and the text are vector artists. Layout sizes are in inches
# and scale with ``dpi``.

_PANEL_IN = 2.3  # width of a panel cell
_GAP_IN = 0.22  # between the fixed, moving, warped and difference cells
_BAR_IN = 0.72  # colour-bar column after the difference and det(J) panels
_LEFT_IN = 0.38  # row labels
_RIGHT_IN = 0.05
_ROW_GAP_IN = 0.16
_HEAD_IN = 0.34  # column titles
_TITLE_IN = 0.34
_BOTTOM_IN = 0.08
_FOLD_COLOUR = (0, 255, 0)


def _lut(name: str) -> np.ndarray:
    """``(256, 3)`` uint8 lookup table of the matplotlib colormap ``name`` (gray, RdBu_r and
    coolwarm stored in :mod:`voxreg.viz._colormaps`; any other from matplotlib)."""
    lut = _LUTS.get(name)
    if lut is None:
        from voxreg.viz._colormaps import LUT_HEX

        if name in LUT_HEX:
            lut = np.frombuffer(bytes.fromhex(LUT_HEX[name]), dtype=np.uint8).reshape(256, 3)
        else:
            from matplotlib import colormaps

            lut = colormaps[name](np.linspace(0.0, 1.0, 256), bytes=True)[:, :3]
        _LUTS[name] = lut
    return lut


_LUTS: dict[str, np.ndarray] = {}

#: matplotlib ``MaxNLocator``'s default steps (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10), extended a
#: decade down and up as it does
_STEPS = np.array([1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0])
_TICK_STEPS = np.concatenate([0.1 * _STEPS[:-1], _STEPS, [10.0 * _STEPS[1]]])


def nice_ticks(vmin: float, vmax: float, bins: int = 5) -> np.ndarray:
    """Tick values at round steps (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten) covering ``vmin`` ..
    ``vmax`` in at most ``bins`` intervals, at least two inside the range: matplotlib's
    ``MaxNLocator(bins).tick_values(vmin, vmax)`` for ranges not far from zero (what a
    colour bar of figure.png shows), without importing matplotlib."""
    span = vmax - vmin
    scale = 10.0 ** math.floor(math.log10(span / bins))
    steps = _TICK_STEPS * scale
    large = np.flatnonzero(steps >= span / bins)
    first = int(large[0]) if large.size else len(steps) - 1
    ticks = np.array([vmin, vmax])
    for step in steps[: first + 1][::-1]:
        base = (vmin // step) * step
        low = _multiple_at_most((vmin - base) / step)
        high = _multiple_at_least((vmax - base) / step)
        ticks = np.arange(low, high + 1) * step + base
        if ((ticks <= vmax) & (ticks >= vmin)).sum() >= 2:
            break
    return ticks


def _multiple_at_most(ratio: float) -> float:
    """Largest integer ``n <= ratio``, ``ratio`` within 1e-10 of the next counting as it."""
    whole, rest = divmod(ratio, 1.0)
    return whole + 1 if abs(rest - 1.0) < 1e-10 else whole


def _multiple_at_least(ratio: float) -> float:
    """Smallest integer ``n >= ratio``, ``ratio`` within 1e-10 of the one below counting as it."""
    whole, rest = divmod(ratio, 1.0)
    return whole if abs(rest) < 1e-10 else whole + 1


def _colour(image: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    """``(..., 3)`` uint8: ``image`` mapped through ``cmap`` between ``vmin`` and ``vmax``."""
    scaled = (np.nan_to_num(image, nan=vmin) - vmin) * (256.0 / (vmax - vmin))
    return _lut(cmap)[np.clip(scaled, 0, 255).astype(np.uint8)]


def _pixel_index(n_voxels: int, n_pixels: int, reverse: bool) -> np.ndarray:
    """Nearest voxel of each of ``n_pixels`` pixels spanning ``n_voxels`` voxels, in display order."""
    idx = np.minimum(((np.arange(n_pixels) + 0.5) * (n_voxels / n_pixels)).astype(np.intp), n_voxels - 1)
    return n_voxels - 1 - idx if reverse else idx


@dataclass(frozen=True)
class _Panel:
    """Where one row's slices are drawn in the mosaic (pixels, rows counted from the top)."""

    plane: DisplayPlane
    top: int  # image top row
    height: int
    lefts: tuple[int, ...]  # image left column of each of the five panels
    width: int
    size_h: int  # voxels along the horizontal / vertical display axes
    size_v: int

    def resample(self, image: np.ndarray) -> np.ndarray:
        """``[h, v]`` slice -> ``(height, width)`` displayed pixels (top row first)."""
        rows = _pixel_index(self.size_v, self.height, reverse=not self.plane.flip_v)
        cols = _pixel_index(self.size_h, self.width, reverse=self.plane.flip_h)
        return image[cols[None, :], rows[:, None]]

    def to_pixels(self, points: np.ndarray, column: int) -> np.ndarray:
        """``(..., 2)`` voxel ``(h, v)`` coordinates -> mosaic ``(x, y)`` pixel coordinates."""
        scale_h, scale_v = self.width / self.size_h, self.height / self.size_v
        h = self.size_h - 1 - points[..., 0] if self.plane.flip_h else points[..., 0]
        v = points[..., 1] if self.plane.flip_v else self.size_v - 1 - points[..., 1]
        return np.stack([self.lefts[column] + (h + 0.5) * scale_h, self.top + (v + 0.5) * scale_v], axis=-1)


def _layout(
    shape: Sequence[int], spacing: Sequence[float], planes: list[DisplayPlane], title: str, dpi: int
) -> tuple[list[_Panel], tuple[int, int]]:
    """Panels of every row (one per plane) and the mosaic size ``(height, width)``: each row
    is a panel tall in proportion to its millimetre extent (clamped to 0.4..2 panel widths),
    each image fitted into its cell at square millimetre pixels and centred."""
    sizes = [(shape[p.horizontal], shape[p.vertical]) for p in planes]
    extents = [(s_h * spacing[p.horizontal], s_v * spacing[p.vertical]) for p, (s_h, s_v) in zip(planes, sizes)]

    def px(inches: float) -> int:
        return int(round(inches * dpi))

    panel = px(_PANEL_IN)
    cells, x = [], px(_LEFT_IN)
    for c in range(len(_COLUMNS)):
        cells.append(x)
        x += panel + (px(_BAR_IN) if c >= 3 else px(_GAP_IN))
    width = x + px(_RIGHT_IN)  # x already includes the last colour-bar column
    y = px(_HEAD_IN + (_TITLE_IN if title else 0.0))
    panels = []
    for (w_mm, h_mm), (size_h, size_v), plane in zip(extents, sizes, planes):
        row = int(round(panel * min(max(h_mm / w_mm, 0.4), 2.0)))
        scale = min(panel / w_mm, row / h_mm)
        w_px, h_px = max(int(round(w_mm * scale)), 1), max(int(round(h_mm * scale)), 1)
        lefts = tuple(c + (panel - w_px) // 2 for c in cells)
        panels.append(_Panel(plane, y + (row - h_px) // 2, h_px, lefts, w_px, size_h, size_v))
        y += row + px(_ROW_GAP_IN)
    height = y - px(_ROW_GAP_IN) + px(_BOTTOM_IN)
    return panels, (height, width)


def _frame(mosaic: np.ndarray, top: int, left: int, height: int, width: int) -> None:
    """1-pixel black frame just outside the image ``[top:top+height, left:left+width]``."""
    y0, y1 = max(top - 1, 0), min(top + height, mosaic.shape[0] - 1)
    x0, x1 = max(left - 1, 0), min(left + width, mosaic.shape[1] - 1)
    mosaic[y0, x0 : x1 + 1] = mosaic[y1, x0 : x1 + 1] = 0
    mosaic[y0 : y1 + 1, x0] = mosaic[y0 : y1 + 1, x1] = 0


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (its contour)."""
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1] = mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return mask & ~inner


def _colour_bar(canvas: _Canvas, mosaic: np.ndarray, panel: _Panel, column: int, cmap: str, vmin: float, vmax: float):
    """Vertical colour bar (5%..95% of the panel height) right of ``column`` with tick labels
    (the tick marks go into ``mosaic``, the labels onto ``canvas``)."""
    dpi = canvas.dpi
    left = panel.lefts[column] + panel.width + int(round(0.08 * dpi))
    bar_w = max(int(round(0.11 * dpi)), 3)
    top = panel.top + int(round(0.05 * panel.height))
    bar_h = max(int(round(0.9 * panel.height)), 2)
    values = vmax - (np.arange(bar_h) + 0.5) * ((vmax - vmin) / bar_h)  # top = vmax
    mosaic[top : top + bar_h, left : left + bar_w] = _colour(values, cmap, vmin, vmax)[:, None]
    _frame(mosaic, top, left, bar_h, bar_w)
    tick = max(int(round(0.03 * dpi)), 2)
    ticks = nice_ticks(vmin, vmax)
    ticks = ticks[(ticks >= vmin - 1e-9 * (vmax - vmin)) & (ticks <= vmax + 1e-9 * (vmax - vmin))]
    # one number of decimals for all labels, as matplotlib's colour bars (0.0, 0.4, ..., 2.0)
    decimals = next((d for d in range(7) if np.allclose(np.round(ticks, d), ticks, rtol=0, atol=1e-9)), 6)
    for value in ticks:
        y = top + (vmax - value) / (vmax - vmin) * bar_h
        row = min(int(y), top + bar_h - 1)
        mosaic[row, left + bar_w : left + bar_w + tick] = 0
        label = f"{0.0 if abs(value) < 1e-12 * (vmax - vmin) else value:.{decimals}f}".replace("-", "\u2212")
        canvas.later(left + bar_w + tick + 2, y, label, 6.5, ha="left", va="center")


def _render(
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    field: np.ndarray,
    title: str | Callable[[], str],
    spacing: np.ndarray,
    planes: list[DisplayPlane],
    grid_step: int | None,
    dpi: int,
) -> np.ndarray:
    """The figure's ``(H, W, 3)`` uint8 pixels: the mosaic of every panel with the grid lines
    and text drawn over it (a callable ``title`` is called last, once the panels are drawn)."""
    cuts = [{k: _cut(a, p) for k, a in (("fixed", fixed), ("moving", moving), ("warped", warped))} for p in planes]
    image_range = robust_range([c["fixed"] for c in cuts])
    before = [np.abs(c["moving"] - c["fixed"]) for c in cuts]
    diff_range = max(robust_range(before)[1], 1e-6)
    panels, (height, width) = _layout(fixed.shape, spacing, planes, title, dpi)
    mosaic = np.full((height, width, 3), 255, dtype=np.uint8)
    canvas = _Canvas(dpi)
    step = grid_step or max(int(round(max(fixed.shape) / 24)), 2)
    grids = []
    for r, (panel, data, before_abs) in enumerate(zip(panels, cuts, before)):
        plane, top, h_px, w_px = panel.plane, panel.top, panel.height, panel.width
        diff = data["warped"] - data["fixed"]
        jac = _jacobian_slice(field, plane)
        shown = [
            _colour(panel.resample(data["fixed"]), "gray", *image_range),
            _colour(panel.resample(data["moving"]), "gray", *image_range),
            _colour(panel.resample(data["warped"]), "gray", *image_range),
            _colour(panel.resample(diff), "RdBu_r", -diff_range, diff_range),
        ]
        jac_shown = panel.resample(jac)
        jac_rgb = _colour(jac_shown, "coolwarm", 0.0, 2.0)
        jac_rgb[_outline(jac_shown <= 0)] = _FOLD_COLOUR
        shown.append(jac_rgb)
        for left, rgb in zip(panel.lefts, shown):
            mosaic[top : top + h_px, left : left + w_px] = rgb
            _frame(mosaic, top, left, h_px, w_px)
        _colour_bar(canvas, mosaic, panel, 3, "RdBu_r", -diff_range, diff_range)
        _colour_bar(canvas, mosaic, panel, 4, "coolwarm", 0.0, 2.0)
        # deformed grid over det(J), in mosaic pixels, clipped to the panel
        along_h, along_v = grid_lines(_cut(field[plane.horizontal], plane), _cut(field[plane.vertical], plane), step)
        lines = [xy for group in (along_h, along_v) for xy in panel.to_pixels(group, 4)]
        grids.append((lines, (panel.lefts[4], top, w_px, h_px)))
        canvas.later(
            panel.lefts[3] + 0.02 * w_px + 2,
            top + h_px - 0.02 * h_px - 2,
            f"MAE {np.abs(diff).mean():.3g} (before {before_abs.mean():.3g})",
            6.5,
            va="bottom",
            background=0.6,
        )
        if plane.name:
            canvas.later(
                panel.lefts[0] - 0.1 * dpi, top + h_px / 2, plane.name, 8, ha="right", va="center", rotation=90
            )
        if r == 0:
            names = (*_COLUMNS[:4], "grid x+u(x) on det(J)")
            for left, name in zip(panel.lefts, names):
                canvas.later(left + w_px / 2, top - 0.06 * dpi, name, 9, ha="center", va="bottom")
    image = canvas.start(mosaic)
    for lines, box in grids:
        canvas.lines(image, lines, box, width_points=0.5)
    if title:
        canvas.later(width / 2, 0.12 * dpi, title() if callable(title) else title, 11, ha="center", va="top")
    canvas.texts(image)
    return np.asarray(image)


#: Pillow's text anchors for matplotlib's horizontal / vertical alignments
_ANCHOR_H = {"left": "l", "center": "m", "right": "r"}
_ANCHOR_V = {"top": "t", "center": "m", "bottom": "b", "baseline": "s"}
#: grid lines are drawn at this many times the resolution and averaged down (anti-aliasing)
_LINE_SUPERSAMPLING = 4


class _Canvas:
    """Text and grid lines drawn over the mosaic with Pillow (sizes in points at ``dpi``, as
    matplotlib's): text is collected by :meth:`later` and drawn by :meth:`texts` once the
    panels are done (a title may wait for the metrics)."""

    def __init__(self, dpi: int) -> None:
        self.dpi = dpi
        self.pending: list[tuple[tuple[float, float, str, float], dict]] = []

    def start(self, mosaic: np.ndarray):
        """The mosaic as a Pillow RGB image to draw on."""
        from PIL import Image as PilImage

        return PilImage.fromarray(mosaic)

    def later(self, x: float, y: float, label: str, points: float, **style) -> None:
        """Queue ``label`` at mosaic pixel ``(x, y)`` (y down), ``points`` tall; ``style``:
        ``ha``, ``va``, ``rotation`` (0 or 90) and ``background`` (white at this opacity)."""
        self.pending.append(((x, y, label, points), style))

    def texts(self, image) -> None:
        """Draw the queued text onto ``image``."""
        for (x, y, label, points), style in self.pending:
            self.text(image, x, y, label, points, **style)
        self.pending = []

    def text(
        self,
        image,
        x: float,
        y: float,
        label: str,
        points: float,
        ha: str = "left",
        va: str = "baseline",
        rotation: int = 0,
        background: float = 0.0,
    ) -> None:
        """Black ``label`` at ``(x, y)`` aligned by ``ha``/``va`` (of the rotated text's box
        when ``rotation`` is 90, which reads bottom to top)."""
        from PIL import Image as PilImage
        from PIL import ImageDraw

        font = _font(points * self.dpi / 72.0)
        if rotation == 0:
            anchor = _ANCHOR_H[ha] + _ANCHOR_V[va]
            if background:
                left, top, right, bottom = (int(round(v)) for v in font.getbbox(label, anchor=anchor))
                box = (int(x) + left - 2, int(y) + top - 2, int(x) + right + 2, int(y) + bottom + 2)
                crop = image.crop(box)
                image.paste(PilImage.blend(crop, PilImage.new("RGB", crop.size, (255, 255, 255)), background), box[:2])
            ImageDraw.Draw(image).text((x, y), label, fill=(0, 0, 0), font=font, anchor=anchor)
            return
        left, top, right, bottom = font.getbbox(label, anchor="lt")
        mask = PilImage.new("L", (int(right - left) + 2, int(bottom - top) + 2), 0)
        ImageDraw.Draw(mask).text((1 - left, 1 - top), label, fill=255, font=font, anchor="lt")
        mask = mask.rotate(rotation, expand=True)
        width, height = mask.size
        left = {"left": x, "center": x - width / 2, "right": x - width}[ha]
        top = {"top": y, "center": y - height / 2, "bottom": y - height, "baseline": y - height}[va]
        image.paste((0, 0, 0), (int(round(left)), int(round(top))), mask)

    def lines(
        self, image, polylines: Sequence[np.ndarray], box: tuple[int, int, int, int], width_points: float
    ) -> None:
        """Black ``polylines`` (``(n, 2)`` mosaic pixel ``(x, y)`` each) clipped to ``box``
        (left, top, width, height), ``width_points`` wide, anti-aliased."""
        from PIL import Image as PilImage
        from PIL import ImageDraw

        left, top, width, height = box
        scale = _LINE_SUPERSAMPLING
        mask = PilImage.new("L", (width * scale, height * scale), 0)
        draw = ImageDraw.Draw(mask)
        stroke = max(int(round(width_points * self.dpi / 72.0 * scale)), 1)
        offset = np.array([left, top], dtype=np.float64)
        for xy in polylines:
            points = ((np.asarray(xy, dtype=np.float64) - offset) * scale).ravel().tolist()
            draw.line(points, fill=255, width=stroke)
        image.paste((0, 0, 0), (left, top), mask.reduce(scale))


def _font(pixels: float):
    """DejaVu Sans (matplotlib's default font, from its installed files; nothing is
    imported) about ``pixels`` tall, else Pillow's own font."""
    return _font_of_size(max(int(round(pixels)), 1))


@functools.lru_cache(maxsize=8)
def _font_of_size(pixels: int):
    """:func:`_font` at a whole number of pixels (cached)."""
    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            try:
                return ImageFont.truetype(str(path), pixels)
            except OSError:  # a Pillow built without FreeType
                break
    return ImageFont.load_default(pixels)


def _save_atomic(rgb: np.ndarray, path: Path, dpi: int) -> None:
    """Write the ``(H, W, 3)`` uint8 pixels as PNG through :func:`voxreg.io.atomic_write`
    (temporary name, then rename; the file follows the umask like every other output; a
    failure, e.g. a full disk, is one VoxregError naming the file)."""
    from PIL import Image as PilImage

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as handle:
            PilImage.fromarray(rgb).save(handle, format="png", dpi=(dpi, dpi), compress_level=_PNG_LEVEL)

    atomic_write(path, write)


_PNG_LEVEL = 3


def registration_figure(
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    field: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    title: str | Callable[[], str] = "",
    spacing: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
    grid_step: int | None = None,
    dpi: int = 110,
) -> Path:
    """Write a PNG summarising one registration; returns its path.

    ``fixed``, ``moving`` (already on the fixed grid) and ``warped`` are spatial arrays of
    one shape; ``field`` ``(ndim, *S)`` (or ``(1, ndim, *S)``, numpy or tensor) is the
    displacement in voxels. ``spacing`` (mm per axis) sets the pixel aspect, taken from
    ``affine`` when omitted; ``affine`` also fixes the anatomical orientation of the rows.
    ``grid_step`` is the grid spacing in voxels (default ~1/24 of the largest size).
    ``title`` may be a function, called once the panels are drawn (a title showing metrics
    still being computed on another thread).
    Written atomically (temporary file in the same folder, then renamed).
    """
    fixed, moving, warped = (np.asarray(a, dtype=np.float32) for a in (fixed, moving, warped))
    field = _as_numpy_field(field, fixed.ndim)
    _check_inputs(fixed, moving, warped, field)
    if spacing is None:
        spacing = voxel_spacing(affine, fixed.ndim) if affine is not None else np.ones(fixed.ndim)
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (fixed.ndim,) or np.any(spacing <= 0):
        raise VoxregError(f"figure: spacing must be {fixed.ndim} positive numbers, got {spacing}")
    planes = display_planes(fixed.shape, affine)
    rgb = _render(fixed, moving, warped, field, title, spacing, planes, grid_step, dpi)
    out = Path(path)
    _save_atomic(rgb, out, dpi)
    return out


cut = _cut
