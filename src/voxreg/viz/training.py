"""Figures of training: the loss curve of a run (``loss_curve.png``) and the summary of
preprocessed training scans (``summary.png``). Matplotlib object API with the Agg canvas."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from voxreg.core.image import Image
from voxreg.io.files import PathLike, atomic_path
from voxreg.viz.registration_figure import DisplayPlane, cut, display_planes, show_slice

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_losses", "summary_figure", "summary_plane", "summary_slice"]

_COLUMNS = 6  # summary panels per row


def _running_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (NaN values skipped; NaN where none)."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def plot_losses(path: PathLike, history: Sequence[Mapping[str, float]]) -> Path:
    """Loss curves (total, similarity, regulariser) and validation Dice, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [r["step"] for r in history]
    window = max(1, len(history) // 50)  # per-step losses of random pairs are noisy: show a running mean too
    for key in ("loss", "similarity", "regularizer"):
        values = [r.get(key, math.nan) for r in history]
        (line,) = ax.plot(steps, values, lw=0.6, alpha=0.3 if window > 1 else 1.0)
        label = key if window == 1 else f"{key} (mean of {window} steps)"
        ax.plot(steps, _running_mean(values, window), color=line.get_color(), lw=1.5, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    val = [(r["step"], r["val_dice"]) for r in history if "val_dice" in r]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "k.-", label="val Dice")
        ax2.set_ylabel("validation Dice")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left" if val else "best")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path


def summary_plane(grid: Image) -> DisplayPlane:
    """The middle axial plane of the grid (the whole image in 2D)."""
    return display_planes(grid.shape, grid.affine if grid.ndim == 3 else None)[0]


def summary_slice(array: np.ndarray, plane: DisplayPlane) -> np.ndarray:
    """2D slice ``[horizontal, vertical]`` of ``array`` on ``plane`` (as every figure cuts it)."""
    return cut(array, plane)


def _draw_panel(
    ax: Axes, image: np.ndarray | None, outline: np.ndarray, plane: DisplayPlane, aspect: float, title: str
) -> None:
    """One summary panel: ``[h, v]`` slice (or a 'failed' note) with the atlas outline."""
    size_h, size_v = outline.shape
    if image is None:
        ax.set_facecolor("black")
        ax.text(0.5, 0.5, "failed", color="red", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(-0.5, size_h - 0.5)
    ax.set_ylim(-0.5, size_v - 0.5)
    show_slice(ax, image, plane, aspect, cmap="gray", vmin=0.0, vmax=1.0)
    if outline.max() > 0.5 > outline.min():
        ax.contour(outline.T, levels=[0.5], colors="yellow", linewidths=0.7)
    ax.set_title(title, fontsize=7)


def summary_figure(
    slices: Sequence[tuple[str, np.ndarray | None]],
    outline: np.ndarray,
    grid: Image,
    path: PathLike,
    note: str = "",
    dpi: int = 100,
) -> Path:
    """Write ``summary.png``: one panel per ``(title, slice)`` (slice ``[h, v]`` on the summary
    plane, None for a failed scan), each with the atlas ``outline`` slice contoured at 0.5;
    ``note`` is appended to the figure title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plane = summary_plane(grid)
    spacing = grid.spacing
    aspect = float(spacing[plane.vertical] / spacing[plane.horizontal])
    size_h, size_v = outline.shape
    panel_w = 2.0
    panel_h = panel_w * min(max(aspect * size_v / size_h, 0.4), 2.5)
    columns = min(_COLUMNS, max(len(slices), 1))
    rows = max(math.ceil(len(slices) / columns), 1)
    fig = Figure(figsize=(panel_w * columns, (panel_h + 0.3) * rows + 0.35))
    FigureCanvasAgg(fig)
    for index, (title, image) in enumerate(slices):
        ax = fig.add_subplot(rows, columns, index + 1)
        _draw_panel(ax, image, outline, plane, aspect, title)
    fig.suptitle(
        f"{plane.name or 'slice'} on grid {grid.shape}, atlas outline in yellow{note}",
        fontsize=8,
        y=1 - 0.05 / fig.get_figheight(),
        va="top",
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
