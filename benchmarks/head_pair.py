"""Heads with skull: models alone on a head pair (validation only, ../shared/data): the ANTsPy
MNI152 1 mm head (fixed) and the Colin27 head (moving). Local NCC (window 9) of fixed and
warped inside the brain (the MNI parcellation ``mnia`` > 0), % folding, and a figure of
mid-slices (fixed, affine only, then each model's result).

Usage: python benchmarks/head_pair.py MODEL.pt ... [--png OUT.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from voxreg import io, metrics
from voxreg.losses import similarity
from voxreg.registration import pipeline as api

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain_mri" / "templates_antspy"


def brain_local_ncc(fixed: np.ndarray, warped: np.ndarray, mask: np.ndarray) -> float:
    """Mean local NCC (squared, window 9) of two [0, 1] images over the mask's voxels."""
    f = torch.from_numpy(io.normalize_intensity(fixed))[None, None]
    w = torch.from_numpy(io.normalize_intensity(warped))[None, None]
    with torch.no_grad():
        cc = similarity.local_ncc_map(f, w, 9)[0, 0].numpy()
    return float(cc[mask].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--png", type=Path, default=Path("head_pair.png"))
    args = parser.parse_args()
    fixed, moving = DATA / "mni.nii.gz", DATA / "ch2.nii.gz"
    mask = io.load_image(DATA / "mnia.nii.gz", label=True).array > 0
    world = api.register(fixed, moving, affine_only=True, metrics=False).world_matrix
    fixed_array = io.load_image(fixed).array
    rows = {"affine only": api.register(fixed, moving, world_matrix=world, affine_only=True, metrics=False)}
    for model in args.models:
        rows[model.name] = api.register(fixed, moving, model=model, refine=0, world_matrix=world, metrics=False)
    for name, result in rows.items():
        folding = metrics.jacobian_stats(result.field)["folding_percent"]
        ncc = brain_local_ncc(fixed_array, result.warped.array, mask)
        print(f"{name:24s} local NCC in the brain {ncc:.4f}   folding {folding:.4f} %")
    save_figure(fixed_array, {k: r.warped.array for k, r in rows.items()}, args.png)
    print(f"wrote {args.png}")


def save_figure(fixed: np.ndarray, warped: dict[str, np.ndarray], path: Path) -> None:
    """Axial and coronal mid-slices: fixed, then each warped image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = {"fixed (MNI152 head)": fixed, **warped}
    fig = Figure(figsize=(3 * len(images), 6))
    FigureCanvasAgg(fig)
    z, y = fixed.shape[2] // 2, fixed.shape[1] // 2
    for col, (name, array) in enumerate(images.items()):
        for row, plane in enumerate((array[:, :, z], array[:, y, :])):
            ax = fig.add_subplot(2, len(images), row * len(images) + col + 1)
            ax.imshow(np.rot90(plane), cmap="gray")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
