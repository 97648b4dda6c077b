"""Heads with skull: how each engine does on raw T1w head pairs (issue 23, "heads as well as brains").

The heads are OpenfMRI ds000011 (Foerde, Knowlton & Poldrack 2006; PDDL 1.0) as copied in GitHub
``sbassetto/LHData`` @b08773c5 (``sub-XX/anat/sub-XX_T1w.nii.gz``, 14 adults, 1 x 1.33 x 1.33 mm,
defaced heads with skull and neck; DEVELOPERS guide / docs/models.md say how to bring them), or any
folder of ``*sub-XX*.nii.gz`` heads. There are no manual labels, so the score is the mean local
NCC (squared, window 9) of the fixed and warped scans **inside the brain**: the MNI152 brain mask
of the nilearn wheel mapped onto the fixed head by voxreg's affine stage (template -> head).
Also % folding and seconds (affine + deformable + warp, files excluded), and a figure of
mid-slices per pair.

    python benchmarks/head_pairs.py FOLDER [--pairs 12:11 14:13] [--methods affine,network,default,instance] [--passes N]
                                           [--model brain-real] [--png OUT.png] [--json OUT.json]
    the same score on brain-extracted pairs, for comparison (../shared, validation only):
    python benchmarks/head_pairs.py ../shared/data/brain_mri/mindboggle_oasis_trt20 --pairs 2:1 4:3 6:5 8:7 \
        --pattern 'OASIS-TRT-20-{n}/t1weighted_brain.nii.gz'
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from voxreg import io, metrics
from voxreg.io import templates
from voxreg.losses import similarity
from voxreg.registration import pipeline as api

METHODS = ("affine", "network", "default", "instance")


def scan_of(folder: Path, number: int, pattern: str | None = None) -> Path:
    """The scan of subject ``number`` in ``folder``: ``pattern`` with ``{n}`` replaced, or the
    first ``...sub-NN...nii[.gz]`` found recursively (not a T2)."""
    if pattern:
        path = folder / pattern.format(n=number)
        if not path.is_file():
            raise SystemExit(f"{path}: not found")
        return path
    for path in sorted(folder.rglob("*.nii*")):
        match = re.search(r"sub-(\d+)", path.name)
        if match and int(match.group(1)) == number and "T2" not in path.name:
            return path
    raise SystemExit(f"{folder}: no scan of subject {number}")


def brain_mask_on(fixed: Path, work: Path) -> np.ndarray:
    """The MNI152 brain mask on the grid of ``fixed`` (template -> fixed, voxreg's affine stage,
    labels resampled by exact nearest neighbour)."""
    template, mask = work / "mni.nii.gz", work / "mni_mask.nii.gz"
    if not template.exists():
        io.save_image(templates.mni152_template(1), template)
        brain = templates.mni152_brain_mask(1)
        io.save_image(type(brain)(brain.array.astype(np.uint8), brain.affine), mask)
    result = api.register(fixed, template, affine_only=True, moving_labels=[mask], metrics=False)
    return next(iter(result.warped_labels.values())).array > 0


def brain_local_ncc(fixed: np.ndarray, warped: np.ndarray, mask: np.ndarray) -> float:
    """Mean local NCC (squared, window 9) of two images scaled to [0, 1], over the mask."""
    f = torch.from_numpy(io.normalize_intensity(fixed))[None, None]
    w = torch.from_numpy(io.normalize_intensity(warped))[None, None]
    with torch.no_grad():
        cc = similarity.local_ncc_map(f, w, 9)[0, 0].numpy()
    return float(cc[mask].mean())


def run_method(
    method: str,
    fixed: Path,
    moving: Path,
    world: np.ndarray,
    model: str | None,
    symmetric: bool | None = None,
    passes: int | None = None,
) -> api.RegistrationResult:
    """One engine on one pair from the shared affine alignment ``world`` (``symmetric``: the
    network's inference, ``passes``: its cascade, None = its card's)."""
    if method == "affine":
        return api.register(fixed, moving, world_matrix=world, affine_only=True, metrics=False)
    if method == "network":
        return api.register(
            fixed,
            moving,
            world_matrix=world,
            engine="network",
            model=model,
            refine=0,
            metrics=False,
            symmetric=symmetric,
            passes=passes,
        )
    if method == "instance":
        return api.register(fixed, moving, world_matrix=world, engine="instance", metrics=False)
    return api.register(fixed, moving, world_matrix=world, metrics=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--pairs", nargs="+", default=["12:11", "14:13", "11:13", "12:14"], help="moving:fixed")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--model", default=None, help="network of the 'network' method (default: the shipped one)")
    parser.add_argument("--symmetric", action="store_true", help="run a checkpoint's network both ways")
    parser.add_argument("--passes", type=int, default=None, help="network passes (register --passes)")
    parser.add_argument("--pattern", default=None, help="scan path in FOLDER with {n} for the subject number")
    parser.add_argument("--png", type=Path, default=Path("head_pairs.png"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows: list[dict[str, object]] = []
    figure: dict[str, dict[str, np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs:
            moving_n, fixed_n = (int(x) for x in pair.split(":"))
            fixed, moving = (scan_of(args.folder, n, args.pattern) for n in (fixed_n, moving_n))
            mask = brain_mask_on(fixed, Path(tmp))
            fixed_array = io.load_image(fixed).array
            world = api.register(fixed, moving, affine_only=True, metrics=False).world_matrix
            label = f"{moving_n}->{fixed_n}"
            figure[label] = {"fixed (brain mask outlined)": fixed_array, "mask": mask}
            for method in methods:
                start = time.perf_counter()
                symmetric = True if args.symmetric else None
                result = run_method(method, fixed, moving, world, args.model, symmetric, args.passes)
                seconds = time.perf_counter() - start
                row = {
                    "pair": f"{moving_n}->{fixed_n}",
                    "method": method,
                    "engine": result.metrics.get("engine", method) if result.metrics else method,
                    "brain_local_ncc": round(brain_local_ncc(fixed_array, result.warped.array, mask), 4),
                    "folding_percent": round(float(metrics.jacobian_stats(result.field)["folding_percent"]), 4),
                    "seconds": round(seconds, 2),
                }
                rows.append(row)
                figure[label][method] = result.warped.array
                print(row, flush=True)
    print_table(rows, methods)
    save_figure(figure, args.png)
    print(f"wrote {args.png}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def print_table(rows: list[dict[str, object]], methods: list[str]) -> None:
    """Markdown table: mean brain local NCC, folding and seconds per method."""
    print("| method | brain local NCC | % folding | s per pair |\n|---|---|---|---|")
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        mean = {
            k: float(np.mean([float(r[k]) for r in mine])) for k in ("brain_local_ncc", "folding_percent", "seconds")
        }
        print(f"| {method} | {mean['brain_local_ncc']:.4f} | {mean['folding_percent']:.4f} | {mean['seconds']:.2f} |")


def save_figure(figure: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """One row per pair: the fixed head's axial mid-slice, then each method's warped scan."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = max(len(images) for images in figure.values()) - 1  # the mask is drawn, not shown
    fig = Figure(figsize=(2.6 * columns, 2.8 * len(figure)))
    FigureCanvasAgg(fig)
    for row, (pair, images) in enumerate(figure.items()):
        mask = images["mask"]
        shown = [(name, array) for name, array in images.items() if name != "mask"]
        for col, (name, array) in enumerate(shown):
            ax = fig.add_subplot(len(figure), columns, row * columns + col + 1)
            ax.imshow(np.rot90(array[:, :, array.shape[2] // 2]), cmap="gray")
            if col == 0:
                ax.contour(
                    np.rot90(mask[:, :, mask.shape[2] // 2].astype(float)), levels=[0.5], colors="r", linewidths=0.6
                )
            ax.set_axis_off()
            ax.set_title(f"{pair} {name}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
