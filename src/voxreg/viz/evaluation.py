"""Figures of the evaluation: the per-structure Dice box plot of the report, the small
fixed/warped example figure of each (pair, method) and the lambda curve of ``tune-lambda``.
Every function draws from plain arrays/dicts; files are written atomically."""

from __future__ import annotations

import io as _bytes_io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from voxreg.core.image import Image
from voxreg.io import atomic_path
from voxreg.viz.registration_figure import cut, display_planes, show_slice

STRUCTURES_PER_ROW = 24


def example_figure(fixed: Image, warped: Image, path: str | os.PathLike, title: str = "") -> Path:
    """A small PNG: fixed (top row) and warped (bottom row) mid-slices, display convention
    of :mod:`voxreg.viz.registration_figure`."""
    from matplotlib.figure import Figure

    planes = display_planes(fixed.shape, fixed.affine)
    spacing = fixed.spacing
    low, high = np.percentile(fixed.array, [1, 99])
    fig = Figure(figsize=(2.2 * len(planes), 4.6))
    axes = fig.subplots(2, len(planes), squeeze=False)
    for column, plane in enumerate(planes):
        aspect = float(spacing[plane.vertical] / spacing[plane.horizontal])
        for row, (name, image) in enumerate((("fixed", fixed), ("warped", warped))):
            show_slice(
                axes[row, column],
                cut(image.array, plane),
                plane,
                aspect,
                cmap="gray",
                vmin=low,
                vmax=high if high > low else low + 1,
            )
            if column == 0:
                axes[row, column].set_ylabel(name)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return Path(path)


def chunks(items: list[str], per_row: int) -> list[list[str]]:
    """``items`` split into the fewest rows of at most ``per_row``, of near-equal length."""
    n_rows = max(1, math.ceil(len(items) / per_row))
    size = math.ceil(len(items) / n_rows) if items else 0
    return [items[i : i + size] for i in range(0, len(items), size)] if items else [[]]


def dice_boxplot(
    structures: list[str], values: dict[str, dict[str, list[float]]], methods: list[str], dpi: int = 110
) -> bytes:
    """PNG bytes of a per-structure Dice box plot: ``values[structure][method]`` are the Dice
    samples, one coloured box per method within each structure slot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    methods = [m for m in methods if any(m in v for v in values.values())] or methods
    rows = chunks(structures, STRUCTURES_PER_ROW)
    per_row = max((len(r) for r in rows), default=1)
    width = float(np.clip(1.5 + per_row * (0.2 + 0.18 * max(len(methods), 1)), 8, 22))
    fig = Figure(figsize=(width, 1.0 + 4.2 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    colors = [f"C{i % 10}" for i in range(len(methods))]
    for ax, chunk in zip(axes, rows):
        _draw_boxes(ax, chunk, values, methods, colors)
    if not structures:
        axes[0].text(
            0.5,
            0.5,
            "no per-structure Dice in per_structure.csv",
            ha="center",
            va="center",
            transform=axes[0].transAxes,
            fontsize=12,
        )
    handles = [Patch(facecolor=c, edgecolor="black", alpha=0.8, label=m) for m, c in zip(methods, colors)]
    legend = fig.legend(
        handles=handles,
        loc="outside upper center",
        ncol=min(len(methods), 6),
        frameon=False,
        fontsize=10,
        title="Dice per structure (left and right hemispheres pooled)",
    )
    legend.get_title().set_fontsize(12)
    buffer = _bytes_io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _draw_boxes(
    ax, structures: list[str], values: dict[str, dict[str, list[float]]], methods: list[str], colors: list[str]
) -> None:
    """Boxes of ``structures`` on ``ax``, methods side by side within each structure slot."""
    n = max(len(methods), 1)
    box_width = 0.8 / n
    for j, (method, color) in enumerate(zip(methods, colors)):
        data, positions = [], []
        for i, structure in enumerate(structures):
            dice = values.get(structure, {}).get(method)
            if dice:
                data.append(dice)
                positions.append(i - 0.4 + box_width * (j + 0.5))
        if not data:
            continue
        parts = ax.boxplot(
            data,
            positions=positions,
            widths=box_width * 0.85,
            patch_artist=True,
            manage_ticks=False,
            flierprops=dict(marker=".", markersize=3, alpha=0.6),
            medianprops=dict(color="black", linewidth=1.2),
        )
        for box in parts["boxes"]:
            box.set_facecolor(color)
            box.set_alpha(0.8)
    ax.set_xticks(range(len(structures)))
    ax.set_xticklabels(structures, rotation=40, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_xlim(-0.6, max(len(structures), 1) - 0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.yaxis.grid(True, linestyle=":", alpha=0.6)
    for i in range(1, len(structures)):
        ax.axvline(i - 0.5, color="0.85", linewidth=0.6, zorder=0)


def lambda_curve(
    path: str | os.PathLike,
    lam: Sequence[float],
    dice_mean: Sequence[float],
    dice_std: Sequence[float],
    folding_percent: Sequence[float],
    recommended: float,
    max_folding: float,
    title: str,
) -> Path:
    """PNG of Dice (mean +- std over pairs) and % folding against lambda on a log axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lam, dice, std = np.asarray(lam), np.asarray(dice_mean), np.asarray(dice_std)
    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(lam, dice, "o-", color="tab:blue", label="mean Dice")
    ax.fill_between(lam, dice - std, dice + std, color="tab:blue", alpha=0.2, label="± std over pairs")
    ax.set_xscale("log")
    ax.set_xlabel("λ (regularisation weight)")
    ax.set_ylabel("Dice of warped labels", color="tab:blue")
    ax.axvline(recommended, color="k", ls=":", label=f"recommended λ = {recommended:.3g}")
    ax2 = ax.twinx()
    ax2.plot(lam, list(folding_percent), "s-", color="tab:red", label="% folding (det J ≤ 0)")
    ax2.axhline(max_folding, color="tab:red", ls="--", lw=0.8, label=f"folding limit {max_folding} %")
    ax2.set_ylabel("% voxels with det J ≤ 0", color="tab:red")
    ax2.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)
