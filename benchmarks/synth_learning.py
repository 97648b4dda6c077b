"""Does a synthetically trained model learn real registration? Mean Dice of real held-out
Mindboggle pairs (native 1 mm, manual DKT31+CMA labels, affine first) after voxreg's affine
stage and after the network predicts in its model space, for one or more checkpoints (e.g.
successive last.pt of a training run). The weights never saw these scans: this is validation
only, it never feeds training. Exits cleanly without ../shared/data.

Usage: python benchmarks/synth_learning.py runs/brain-synth-v1/last.pt [more.pt ...] [--pairs 2:1 4:3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import voxreg
from voxreg import io, metrics

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain_mri" / "mindboggle_oasis_trt20"
EXCLUDED = {0, 74}


def _subject(number: int) -> tuple[Path, Path]:
    folder = DATA / f"OASIS-TRT-20-{number}"
    return folder / "t1weighted_brain.nii.gz", folder / "labels_DKT31_CMA.nii.gz"


def _mean_dice(fixed: np.ndarray, warped: np.ndarray) -> float:
    labels = sorted((set(np.unique(fixed)) & set(np.unique(warped))) - EXCLUDED)
    return float(np.nanmean(list(metrics.dice_per_label(fixed, warped, labels).values())))


def evaluate(checkpoint: Path, pairs: list[tuple[int, int]], lam: float | None) -> list[dict]:
    """Dice after affine and after the network for each pair (moving -> fixed)."""
    rows = []
    for moving_id, fixed_id in pairs:
        fixed, fixed_labels = _subject(fixed_id)
        moving, moving_labels = _subject(moving_id)
        start = time.perf_counter()
        affine = voxreg.register(
            fixed, moving, affine_only=True, moving_labels={"labels": moving_labels}, metrics=False, device="cpu"
        )
        network = voxreg.register(
            fixed,
            moving,
            model=checkpoint,
            lam=lam,
            moving_labels={"labels": moving_labels},
            world_matrix=affine.world_matrix,
            metrics=False,
            device="cpu",
        )
        truth = io.load_image(fixed_labels, label=True).array
        jac = metrics.jacobian_stats(network.field)
        rows.append(
            {
                "pair": f"{moving_id}->{fixed_id}",
                "dice_affine": _mean_dice(truth, affine.warped_labels["labels"].array),
                "dice_network": _mean_dice(truth, network.warped_labels["labels"].array),
                "folding_percent": jac["folding_percent"],
                "seconds": time.perf_counter() - start,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--pairs", nargs="+", default=["2:1", "4:3"])
    parser.add_argument("--lam", type=float, default=None)
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} not found (real validation data is not shipped with voxreg)")
        return 0
    pairs = [tuple(int(v) for v in p.split(":")) for p in args.pairs]
    print("| checkpoint | step | pair | Dice affine | Dice network | gain | folding % | s |")
    print("|---|---|---|---|---|---|---|---|")
    for checkpoint in args.checkpoints:
        from voxreg.nn import load_checkpoint

        step = load_checkpoint(checkpoint)[1].get("step", "?")
        for row in evaluate(checkpoint, pairs, args.lam):
            print(
                f"| {checkpoint} | {step} | {row['pair']} | {row['dice_affine']:.4f} | {row['dice_network']:.4f} | "
                f"{row['dice_network'] - row['dice_affine']:+.4f} | {row['folding_percent']:.3f} | {row['seconds']:.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
