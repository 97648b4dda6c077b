"""Figures of template building: ``convergence.png`` (template change and mean similarity per
iteration) and ``montage.png`` (mid-slices of the template at every iteration, then a few
scans warped onto the final template). Matplotlib object API with the Agg canvas; slices
follow the display convention of ``figure.png`` (:mod:`voxreg.viz.registration_figure`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from voxreg.core.image import Image
from voxreg.io.files import PathLike, atomic_path
from voxreg.viz.registration_figure import cut, display_planes, show_slice

__all__ = ["convergence_png", "montage_png"]


def _save(fig: Any, path: PathLike) -> Path:
    """Write ``fig`` as PNG atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def convergence_png(rows: Sequence[Mapping[str, Any]], path: PathLike) -> Path:
    """Template change (RMS intensity difference to the previous iteration, template scaled to
    [0, 1]) and mean local NCC of the warped scans to the template, per iteration."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.2))
    FigureCanvasAgg(fig)
    change_ax, ncc_ax = fig.subplots(1, 2)
    changes = [(r["iteration"], r["template_change_rms"]) for r in rows if r.get("template_change_rms") is not None]
    if changes:
        change_ax.plot(*zip(*changes), "o-", color="tab:red")
    change_ax.set(xlabel="iteration", ylabel="RMS change of the template", title="template change")
    ncc_ax.plot([r["iteration"] for r in rows], [r["mean_local_ncc"] for r in rows], "o-", color="tab:blue")
    ncc_ax.set(xlabel="iteration", ylabel="mean local NCC", title="warped scans vs template")
    for ax in (change_ax, ncc_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _unit(array: np.ndarray) -> np.ndarray:
    """``array`` scaled to [0, 1] between its 1st and 99th percentiles."""
    low, high = np.percentile(array, [1, 99])
    return np.clip((array - low) / max(float(high - low), 1e-6), 0.0, 1.0)


def montage_png(templates: Sequence[tuple[str, Image]], warped: Sequence[tuple[str, Image]], path: PathLike) -> Path:
    """One column per template (iteration) then per warped scan, one row per display plane
    (axial, coronal, sagittal mid-slices; the one plane in 2D); each image scaled by its own
    percentiles. All images lie on the template grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = [*templates, *warped]
    reference = templates[-1][1]
    planes = display_planes(reference.shape, reference.affine if reference.ndim == 3 else None)
    spacing = reference.spacing
    fig = Figure(figsize=(1.9 * len(columns), 2.0 * len(planes) + 0.4))
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(len(planes), len(columns), squeeze=False))
    for c, (title, image) in enumerate(columns):
        scaled = _unit(np.asarray(image.array, dtype=np.float32))
        for r, plane in enumerate(planes):
            aspect = float(spacing[plane.vertical] / spacing[plane.horizontal])
            show_slice(axes[r, c], cut(scaled, plane), plane, aspect, cmap="gray", vmin=0.0, vmax=1.0)
        kind = "template" if c < len(templates) else "warped"
        axes[0, c].set_title(f"{kind}\n{title}", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
