"""Prepare OpenNeuro ds002748 T1w heads (CC0) as training data for the shipped brain model.

    python scripts/prepare_ds002748.py FOLDER -o OUT [--holdout 65-72] [--voxel-mm 2.07 --crop 80x96x80]

FOLDER holds ``sub-XX_T1w.nii.gz``, flat or in BIDS ``sub-XX/anat/`` folders (e.g. extracted from the GitHub repository
aaronsossin/DepressionMRI_AI, DEVELOPERS guide). Each scan is aligned (affine) to the MNI152
template of the nilearn wheel and resampled at the model's 2.07 mm voxel size
(``voxreg.training.preprocess``), then cropped to an 80x96x80 grid centred on the template's
brain and written to ``OUT/brains/<name>.nii.gz``. ``--voxel-mm 1.035 --crop 160x192x160`` makes the
same brains at twice the resolution, for training with the similarity scored on a finer grid than
the network's (``voxreg train --similarity-scale 2``).

The copies in that repository are already brain-extracted (checked on 2026-12-04: every scan's
nonzero voxels span about 135x165x133 mm, a brain, not a head), so there are no head versions
to make; voxels outside the template's brain mask dilated by two voxels are zeroed as well
(left-over neck or dura). With ``--heads`` (scans with skull, e.g. OpenfMRI ds000011 as copied in
GitHub sbassetto/LHData, PDDL) nothing is zeroed and the files go to ``OUT/heads/``: the same
grid and alignment, for training a model that serves heads as well. Scans whose subject number is in ``--holdout`` go to
``OUT/heldout/brains/`` instead (never trained on). ``OUT/train.csv`` and ``OUT/heldout.csv`` list the files. The scans are
never committed; the script is the one reproducible step.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from voxreg import io
from voxreg.core.image import Image
from voxreg.io import templates
from voxreg.training.preprocess import preprocess

VOXEL_MM = 2.07
CROP = (80, 96, 80)
DILATE_VOXELS = 2


def subject_number(path: Path) -> int:
    """``sub-07_T1w.nii.gz`` -> 7."""
    match = re.search(r"sub-(\d+)", path.name)
    if match is None:
        raise SystemExit(f"{path}: no sub-NN in the file name")
    return int(match.group(1))


def crop_box(mask: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Slices of ``shape`` centred on the mask's bounding box, inside the grid."""
    slices = []
    for axis, size in enumerate(shape):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        centre = (hits[0] + hits[-1] + 1) // 2
        start = int(np.clip(centre - size // 2, 0, mask.shape[axis] - size))
        slices.append(slice(start, start + size))
    return tuple(slices)


def cropped(image: Image, box: tuple[slice, ...]) -> Image:
    """The sub-grid ``box`` of ``image`` with its affine moved to the new first voxel."""
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.array([s.start for s in box]) + image.affine[:3, 3]
    return Image(np.ascontiguousarray(image.array[box]), affine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--holdout", default="65-72", help="subject numbers kept out of training (LO-HI)")
    parser.add_argument(
        "--heads",
        action="store_true",
        help="scans with skull (e.g. OpenfMRI ds000011, --holdout 11-14): keep every voxel, write OUT/heads/",
    )
    parser.add_argument("--voxel-mm", type=float, default=VOXEL_MM, help="voxel size of the output grid (mm)")
    parser.add_argument("--crop", default="x".join(map(str, CROP)), help="output grid around the brain, e.g. 80x96x80")
    args = parser.parse_args()
    crop_shape = tuple(int(v) for v in args.crop.split("x"))
    kind = "heads" if args.heads else "brains"
    low, high = (int(v) for v in args.holdout.split("-"))
    scans = sorted(args.folder.rglob("sub-*_T1w.nii*"), key=lambda p: p.name)  # flat or BIDS (sub-XX/anat/)
    if not scans:
        raise SystemExit(f"{args.folder}: no sub-*_T1w.nii(.gz) files")
    with tempfile.TemporaryDirectory() as tmp:
        result = preprocess(scans, tmp, atlas="mni152", spacing=args.voxel_mm, progress=None)
        grid = result.grid
        mask = io.resample_to(templates.mni152_brain_mask(2), grid).array > 0
        mask = ndimage.binary_dilation(
            mask, iterations=round(DILATE_VOXELS * VOXEL_MM / args.voxel_mm)
        )  # the same 4.1 mm
        box = crop_box(mask, crop_shape)
        rows = {"train": [], "heldout": []}
        for record in result.outputs:
            if record.status != "ok":
                print(f"skipped {record.source}: {record.error}")
                continue
            split = "heldout" if low <= subject_number(record.source) <= high else "train"
            base = args.output / ("heldout" if split == "heldout" else "")
            aligned = cropped(io.load_image(Path(tmp) / record.image), box)
            keep = np.ones_like(mask[box]) if args.heads else mask[box]
            scan = aligned.with_array(np.where(keep, aligned.array, 0).astype(np.float32))
            path = base / kind / Path(record.image).name
            path.parent.mkdir(parents=True, exist_ok=True)
            io.save_image(scan, path)
            rows[split].append(str(path.relative_to(args.output)))
            print(
                f"{split:8s} {record.source.name}: affine NCC {record.affine_ncc_before:.3f} -> {record.affine_ncc_after:.3f}"
            )
        shutil.copy(Path(tmp) / "summary.png", args.output / "summary.png")
    for split, names in rows.items():
        (args.output / f"{split}.csv").write_text("scan\n" + "\n".join(names) + "\n")
    print(
        f"{len(rows['train'])} training and {len(rows['heldout'])} held-out files in {args.output} (grid {crop_shape} at {args.voxel_mm} mm)"
    )


if __name__ == "__main__":
    main()
