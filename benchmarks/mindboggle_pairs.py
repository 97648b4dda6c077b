"""Mindboggle OASIS-TRT-20 pairs (native space, manual DKT31+CMA labels): mean Dice of the
labels present in both subjects (excluding 0 and the stray 74) before registration, after
voxreg affine, after voxreg affine + deformable (instance optimisation), and, when antspyx
is installed (pip install 'voxreg[ants]'), after ANTs affine (and ANTs SyN with --ants-syn)
measured in the same run on the same machine.

Usage: python benchmarks/mindboggle_pairs.py [--pairs 2:1 4:3 6:5 8:7] [--ants-syn] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from voxreg import io, metrics
from voxreg.registration import pipeline as api

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EXCLUDED = {0, 74}


def subject(data: Path, number: int) -> tuple[Path, Path]:
    folder = data / "brain_mri" / "mindboggle_oasis_trt20" / f"OASIS-TRT-20-{number}"
    return folder / "t1weighted_brain.nii.gz", folder / "labels_DKT31_CMA.nii.gz"


def mean_dice(fixed_labels: np.ndarray, warped_labels: np.ndarray) -> float:
    labels = sorted((set(np.unique(fixed_labels)) & set(np.unique(warped_labels))) - EXCLUDED)
    return float(np.nanmean(list(metrics.dice_per_label(fixed_labels, warped_labels, labels).values())))


def voxreg_pair(fixed: Path, moving: Path, fixed_labels: Path, moving_labels: Path) -> dict:
    labels_fixed = io.load_image(fixed_labels, label=True).array
    labels_moving = io.load_image(moving_labels, label=True)
    labels_common = set(np.unique(labels_fixed)) & set(np.unique(labels_moving.array))
    raw = api.warp_image(labels_moving, io.load_image(fixed))
    result = api.register(fixed, moving, moving_labels={"labels": labels_moving}, device="cpu")
    affine_only = api.warp_image(labels_moving, result.fixed, world_matrix=result.world_matrix)
    return {
        "labels_in_both": len(labels_common - EXCLUDED),
        "dice_before": mean_dice(labels_fixed, raw.array),
        "dice_voxreg_affine": mean_dice(labels_fixed, affine_only.array),
        "dice_voxreg_affine_deformable": mean_dice(labels_fixed, result.warped_labels["labels"].array),
        "seconds_voxreg_affine": result.metrics["affine"]["seconds"],
        "seconds_voxreg_deformable": result.metrics["registration_seconds"],
        "folding_percent": result.metrics["folding_percent"],
        "log_jacobian_std": result.metrics["log_jacobian_std"],
    }


def ants_pair(fixed: Path, moving: Path, fixed_labels: Path, moving_labels: Path, syn: bool) -> dict:
    import ants  # optional extra: pip install 'voxreg[ants]'

    f, m = ants.image_read(str(fixed)), ants.image_read(str(moving))
    labels_fixed = ants.image_read(str(fixed_labels)).numpy().astype(np.int32)
    labels_moving = ants.image_read(str(moving_labels))
    out: dict = {
        "ants_version": ants.__version__,
        "ants_threads": os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "default"),
    }
    for kind in ["Affine"] + (["SyN"] if syn else []):
        start = time.perf_counter()
        reg = ants.registration(fixed=f, moving=m, type_of_transform=kind)
        seconds = time.perf_counter() - start
        warped = ants.apply_transforms(f, labels_moving, reg["fwdtransforms"], interpolator="nearestNeighbor")
        out[f"dice_ants_{kind.lower()}"] = mean_dice(labels_fixed, warped.numpy().astype(np.int32))
        out[f"seconds_ants_{kind.lower()}"] = seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--pairs", nargs="+", default=["2:1", "4:3", "6:5", "8:7"], help="moving:fixed subject numbers")
    parser.add_argument("--no-ants", action="store_true", help="skip the ANTs baselines")
    parser.add_argument("--ants-syn", action="store_true", help="also run ANTs SyN (antspy default settings)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not subject(args.data, 1)[0].exists():
        raise SystemExit(f"Mindboggle data not found under {args.data}")
    try:
        import ants  # noqa: F401

        have_ants = not args.no_ants
    except ImportError:
        have_ants = False
        print("antspyx not installed (pip install 'voxreg[ants]'): ANTs baselines skipped")
    rows = []
    for pair in args.pairs:
        moving_id, fixed_id = (int(v) for v in pair.split(":"))
        (fixed, fixed_labels), (moving, moving_labels) = subject(args.data, fixed_id), subject(args.data, moving_id)
        row = {"pair": f"{moving_id}->{fixed_id}", **voxreg_pair(fixed, moving, fixed_labels, moving_labels)}
        if have_ants:
            row.update(ants_pair(fixed, moving, fixed_labels, moving_labels, args.ants_syn))
        print(json.dumps(row), flush=True)
        rows.append(row)
    keys = [k for k in rows[0] if k.startswith(("dice", "seconds", "folding"))]
    print("mean over pairs: " + ", ".join(f"{k}={np.mean([r[k] for r in rows if k in r]):.3f}" for k in keys))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
