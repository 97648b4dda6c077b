"""``voxreg template`` side by side with antspyx ``ants.build_template`` on 8 Mindboggle scans.

Both build a template of OASIS-TRT-20-1..8 (``../shared/data/brain_mri/mindboggle_oasis_trt20``,
read in place, never copied into the repository) resampled to 2 mm first (into ``--work``, /tmp by
default) to keep ANTs affordable. Timed: the template command (voxreg: ``voxreg template`` as a
subprocess, which also writes every scan's registration to the final template; ANTs:
``ants.build_template`` with its defaults, 3 iterations of SyN). ANTs returns only the template, so
every scan is then registered to it with ``ants.registration(type_of_transform='SyN')`` (untimed) to
carry its labels. Measured in each template's space: sharpness, the mean local NCC (window 9,
signed) of the warped scans to the template inside the template's brain mask, and label agreement,
the mean pairwise Dice of the scans' warped label maps (labels 0 and 74 excluded).

    python benchmarks/template_vs_ants.py [--only voxreg|ants] [--iterations N] [--work DIR]
                                          [--engine auto|network|instance] [--refine N]

Each side's numbers are cached in ``WORK/<side>.json`` (voxreg: ``voxreg[-<engine>][-refine<N>].json``;
delete to rerun); the table is printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "brain_mri" / "mindboggle_oasis_trt20"
SUBJECTS = [f"OASIS-TRT-20-{k}" for k in range(1, 9)]
EXCLUDED = {0, 74}


def prepare(work: Path) -> list[tuple[Path, Path]]:
    """The 8 scans and label maps resampled to 2 mm (same extent) into ``work/data``."""
    from voxreg import io
    from voxreg.core.grid import level_grid
    from voxreg.core.image import Image

    out = work / "data"
    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for subject in SUBJECTS:
        scan, labels = out / f"{subject}_t1.nii.gz", out / f"{subject}_labels.nii.gz"
        if not labels.exists():
            image = io.load_image(DATA / subject / "t1weighted_brain.nii.gz")
            affine, shape = level_grid(image.affine, image.shape, 2.0)
            grid = Image(np.zeros(shape, np.float32), affine)
            io.save_image(io.resample_to(image, grid), scan)
            io.save_image(
                io.resample_to(io.load_image(DATA / subject / "labels_DKT31_CMA.nii.gz", label=True), grid), labels
            )
        pairs.append((scan, labels))
    return pairs


def sharpness(template: np.ndarray, warped: list[np.ndarray]) -> float:
    """Mean signed local NCC (window 9) of each warped scan to the template in its brain mask."""
    import torch
    from scipy import ndimage

    from voxreg.losses.similarity import local_ncc

    mask = ndimage.binary_fill_holes(template > 0.1 * np.percentile(template, 99))
    fixed = torch.from_numpy(template.astype(np.float32))[None, None]
    weights = torch.from_numpy(mask.astype(np.float32))[None, None]
    values = [
        float(local_ncc(fixed, torch.from_numpy(w.astype(np.float32))[None, None], squared=False, mask=weights))
        for w in warped
    ]
    return float(np.mean(values))


def agreement(labels: list[np.ndarray]) -> float:
    """Mean pairwise Dice (labels present in both maps, 0 and 74 excluded) over all pairs."""
    from voxreg.metrics.overlap import dice_per_label

    scores = []
    for a, b in itertools.combinations(labels, 2):
        common = sorted(set(np.unique(a).tolist()) & set(np.unique(b).tolist()) - EXCLUDED)
        scores.append(np.nanmean(list(dice_per_label(a, b, common).values())))
    return float(np.mean(scores))


def run_voxreg(pairs: list[tuple[Path, Path]], work: Path, iterations: int, options: list[str], name: str) -> dict:
    """Time ``voxreg template`` (with extra ``options``) on a CSV of the scans into
    ``work/name``; measure its outputs."""
    import nibabel as nib

    csv = work / "scans.csv"
    csv.write_text("scan,labels,id\n" + "".join(f"{s},{lab},{s.name[:-10]}\n" for s, lab in pairs))
    out = work / name
    command = [
        sys.executable,
        "-m",
        "voxreg.cli",
        "template",
        str(csv),
        "-o",
        str(out),
        "--iterations",
        str(iterations),
        *options,
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    template = nib.load(out / "template.nii.gz").get_fdata()
    folders = [out / "scans" / s.name[:-10] for s, _ in pairs]
    warped = [nib.load(f / "warped.nii.gz").get_fdata() for f in folders]
    labels = [np.asarray(nib.load(next(f.glob("warped_*labels*.nii.gz"))).dataobj).astype(np.int32) for f in folders]
    return {"seconds": seconds, "sharpness": sharpness(template, warped), "agreement": agreement(labels)}


def run_ants(pairs: list[tuple[Path, Path]], work: Path) -> dict:
    """Time ``ants.build_template`` (defaults); register every scan to it with SyN; measure."""
    import ants

    images = [ants.image_read(str(s)) for s, _ in pairs]
    start = time.perf_counter()
    template = ants.build_template(image_list=images)
    seconds = time.perf_counter() - start
    ants.image_write(template, str(work / "ants_template.nii.gz"))
    warped, labels = [], []
    for image, (_, lab) in zip(images, pairs):
        reg = ants.registration(template, image, type_of_transform="SyN")
        warped.append(reg["warpedmovout"].numpy())
        moved = ants.apply_transforms(template, ants.image_read(str(lab)), reg["fwdtransforms"], "nearestNeighbor")
        labels.append(np.rint(moved.numpy()).astype(np.int32))
    return {"seconds": seconds, "sharpness": sharpness(template.numpy(), warped), "agreement": agreement(labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["voxreg", "ants"])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/voxreg_template_bench"))
    parser.add_argument("--engine", default=None, help="voxreg template --engine (default: its own, auto)")
    parser.add_argument("--refine", type=int, default=None, help="voxreg template --refine")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} not found")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    pairs = prepare(args.work)
    options = (["--engine", args.engine] if args.engine else []) + (
        ["--refine", str(args.refine)] if args.refine is not None else []
    )
    label = "voxreg" + (f"-{args.engine}" if args.engine else "")
    label += f"-refine{args.refine}" if args.refine is not None else ""
    sides = {
        label: lambda: run_voxreg(pairs, args.work, args.iterations, options, label),
        "ants": lambda: run_ants(pairs, args.work),
    }
    for name, run in sides.items():
        cache = args.work / f"{name}.json"
        if args.only in (None, name.split("-")[0]) and not cache.exists():
            cache.write_text(json.dumps(run(), indent=1))
    print("| method | seconds | sharpness (local NCC) | label agreement (pairwise Dice) |\n|---|---|---|---|")
    for name in sides:
        cache = args.work / f"{name}.json"
        if cache.exists():
            r = json.loads(cache.read_text())
            print(f"| {name} | {r['seconds']:.0f} | {r['sharpness']:.3f} | {r['agreement']:.3f} |")


if __name__ == "__main__":
    main()
