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

Matplotlib is used through its object API with the Agg canvas (no pyplot state).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voxreg.core import spatial
from voxreg.core.errors import VoxregError
from voxreg.core.grid import voxel_spacing
from voxreg.io.files import atomic_path

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
    if plane.axis < 0:
        sl = array
    else:
        sl = np.take(array, plane.index, axis=plane.axis)
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
    """Jacobian determinant on the displayed slice, computed on a 3-slice slab only."""
    if plane.axis < 0:
        slab, centre = field, None
    else:
        size = field.shape[1 + plane.axis]
        lo, hi = max(plane.index - 1, 0), min(plane.index + 2, size)
        slab = np.take(field, np.arange(lo, hi), axis=1 + plane.axis)
        centre = plane.index - lo
    det = spatial.jacobian_determinant(torch.from_numpy(np.ascontiguousarray(slab))[None])[0].numpy()
    if centre is not None:
        det = np.take(det, centre, axis=plane.axis)
    in_plane = [d for d in range(field.shape[0]) if d != plane.axis]
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


def _colorbar(fig, ax, artist) -> None:
    from matplotlib.ticker import MaxNLocator

    cax = ax.inset_axes((1.03, 0.05, 0.05, 0.9))
    cbar = fig.colorbar(artist, cax=cax)
    cbar.ax.tick_params(labelsize=6.5)
    cbar.ax.yaxis.set_major_locator(MaxNLocator(5))


def _draw_grid(ax, field: np.ndarray, plane: DisplayPlane, step: int) -> None:
    disp_h = _cut(field[plane.horizontal], plane)
    disp_v = _cut(field[plane.vertical], plane)
    along_h, along_v = grid_lines(disp_h, disp_v, step)
    from matplotlib.collections import LineCollection

    lines = list(along_h) + list(along_v)
    ax.add_collection(LineCollection(lines, colors="k", linewidths=0.5))


def robust_range(arrays: Sequence[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([a.ravel() for a in arrays])
    lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _draw_row(fig, axes, planes_data: dict, plane: DisplayPlane, aspect: float, ranges: dict, step: int) -> None:
    gray = dict(cmap="gray", vmin=ranges["image"][0], vmax=ranges["image"][1])
    for ax, key in zip(axes[:3], ("fixed", "moving", "warped")):
        show_slice(ax, planes_data[key], plane, aspect, **gray)
    diff = planes_data["warped"] - planes_data["fixed"]
    before = np.abs(planes_data["moving"] - planes_data["fixed"]).mean()
    art = show_slice(axes[3], diff, plane, aspect, cmap="RdBu_r", vmin=-ranges["diff"], vmax=ranges["diff"])
    axes[3].text(
        0.02,
        0.02,
        f"MAE {np.abs(diff).mean():.3g} (before {before:.3g})",
        fontsize=6.5,
        transform=axes[3].transAxes,
        color="k",
        backgroundcolor=(1, 1, 1, 0.6),
    )
    _colorbar(fig, axes[3], art)
    jac = _jacobian_slice(planes_data["field"], plane)
    art = show_slice(axes[4], jac, plane, aspect, cmap="coolwarm", vmin=0.0, vmax=2.0)
    folded = jac <= 0
    if folded.any():
        axes[4].contour(folded.T.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
    _colorbar(fig, axes[4], art)
    _draw_grid(axes[4], planes_data["field"], plane, step)
    axes[4].set_xlim(axes[0].get_xlim())
    axes[4].set_ylim(axes[0].get_ylim())


def _render(
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    field: np.ndarray,
    title: str,
    spacing: np.ndarray,
    planes: list[DisplayPlane],
    grid_step: int | None,
):
    from matplotlib.figure import Figure

    cuts = [{k: _cut(a, p) for k, a in (("fixed", fixed), ("moving", moving), ("warped", warped))} for p in planes]
    ranges = {"image": robust_range([c["fixed"] for c in cuts])}
    before = [np.abs(c["moving"] - c["fixed"]) for c in cuts]
    ranges["diff"] = max(robust_range(before)[1], 1e-6)
    extents = [
        (p_h * spacing[p.horizontal], p_v * spacing[p.vertical])
        for p, (p_h, p_v) in zip(planes, (c["fixed"].shape for c in cuts))
    ]
    panel_w = 2.3
    heights = [panel_w * min(max(v / h, 0.4), 2.0) for h, v in extents]
    fig = Figure(figsize=(panel_w * len(_COLUMNS) * 1.25, sum(heights) + 0.6 + 0.3 * bool(title)))
    grid = fig.add_gridspec(
        len(planes),
        len(_COLUMNS),
        height_ratios=heights,
        wspace=0.38,
        hspace=0.08,
        left=0.03,
        right=0.96,
        bottom=0.02,
        top=1 - (0.45 + 0.3 * bool(title)) / fig.get_figheight(),
    )
    step = grid_step or max(int(round(max(fixed.shape) / 24)), 2)
    for r, (plane, data) in enumerate(zip(planes, cuts)):
        axes = [fig.add_subplot(grid[r, c]) for c in range(len(_COLUMNS))]
        aspect = float(spacing[plane.vertical] / spacing[plane.horizontal])
        _draw_row(fig, axes, {**data, "field": field}, plane, aspect, ranges, step)
        if plane.name:
            axes[0].set_ylabel(plane.name, fontsize=8)
        if r == 0:
            for ax, name in zip(axes, _COLUMNS):
                ax.set_title(name, fontsize=9)
            axes[4].set_title("grid x+u(x) on det(J)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.12 / fig.get_figheight(), va="top")
    return fig


def _save_atomic(fig, path: Path, dpi: int) -> None:
    """Render ``fig`` through :func:`voxreg.io.atomic_path` (temporary name, then rename; the
    file follows the umask like every other output)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp, open(tmp, "xb") as handle:
        fig.savefig(handle, format="png", dpi=dpi)


def registration_figure(
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    field: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    title: str = "",
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
    fig = _render(fixed, moving, warped, field, title, spacing, planes, grid_step)
    out = Path(path)
    _save_atomic(fig, out, dpi)
    return out


cut = _cut
