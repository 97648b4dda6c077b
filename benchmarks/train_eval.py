"""Evaluate a trained network on validation pairs of a preprocessed set (one grid, labels):
mean Dice of the labels present in both (0 excluded), % folding and seconds per pair for
identity (= affine only, after `voxreg preprocess`), the network, network + refinement, and
instance optimisation alone.

Usage: python benchmarks/train_eval.py MODEL.pt VAL.csv [--refine 50]
(VAL.csv: scan,labels per line, as for `voxreg train --val`; pairs are consecutive rows)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from voxreg import io, metrics
from voxreg.registration import pipeline as api
from voxreg.training import scan_list


def mean_dice(fixed: np.ndarray, warped: np.ndarray) -> float:
    labels = sorted((set(np.unique(fixed)) & set(np.unique(warped))) - {0})
    return float(np.nanmean(list(metrics.dice_per_label(fixed, warped, labels).values())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("val", type=Path)
    parser.add_argument("--refine", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    scans, labels = scan_list([args.val])
    methods = {
        "affine only": {},
        "network": {"model": args.model},
        f"network + refine {args.refine}": {"model": args.model, "refine": args.refine},
        "instance optimisation": {},
    }
    totals: dict[str, list[tuple[float, float, float]]] = {name: [] for name in methods}
    for index in range(len(scans) - 1):
        fixed, moving = scans[index + 1], scans[index]
        fixed_labels = io.load_image(labels[index + 1], label=True).array
        for name, options in methods.items():
            if name == "affine only":
                dice = mean_dice(fixed_labels, io.load_image(labels[index], label=True).array)
                totals[name].append((dice, 0.0, 0.0))
                continue
            result = api.register(
                fixed, moving, moving_labels=[labels[index]], affine=False, device=args.device, **options
            )
            warped = next(iter(result.warped_labels.values())).array
            totals[name].append(
                (
                    mean_dice(fixed_labels, warped),
                    result.metrics["folding_percent"],
                    result.metrics["registration_seconds"],
                )
            )
        print(
            f"pair {moving.name} -> {fixed.name}: " + ", ".join(f"{n} {t[-1][0]:.3f}" for n, t in totals.items()),
            flush=True,
        )
    summary = {
        name: {
            "dice": float(np.mean([v[0] for v in rows])),
            "folding_percent": float(np.mean([v[1] for v in rows])),
            "seconds_per_pair": float(np.mean([v[2] for v in rows])),
        }
        for name, rows in totals.items()
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
