"""Does coarse-to-fine training or a half-resolution field reach the same validation Dice
in less time? Trains three VoxelMorph-2 networks (NCC, lambda 1, lr 1e-3, same seed and
data) for the same wall-clock budget each and records validation Dice against time:

  full-res field                  the paper's network (field predicted on the input grid)
  half-res field                  field predicted at 1/2 resolution, upsampled (voxreg default)
  half-res field, coarse-to-fine  the first --coarse-steps steps on the grid resized by 0.5

Input: a training list and a labelled validation CSV (scan,labels rows) on one grid, e.g.
made by `voxreg preprocess` (see docs/benchmarks.md). Writes OUT/<run>/metrics.csv,
OUT/resolution_schedule.png and OUT/resolution_schedule.md.

Usage: python benchmarks/resolution_schedule.py TRAIN.csv VAL.csv -o OUT [--minutes 6]
       [--coarse-steps 600] [--validate-every 50]
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import numpy as np

from voxreg.training import TrainConfig, TrainingInterrupted, TrainingSet, scan_list, train

RUNS = {
    "full-res field": {"half_res": False},
    "half-res field": {"half_res": True},
    "half-res field, coarse-to-fine": {"half_res": True, "coarse": True},
}


def run(name: str, options: dict, data: TrainingSet, val: TrainingSet, out: Path, args) -> list[dict]:
    """Train one configuration until the time budget is spent; return its metrics rows."""
    schedule = [(0.5, args.coarse_steps)] if options.get("coarse") else []
    config = TrainConfig(
        similarity="ncc",
        lam=1.0,
        network="vm2",
        half_res=options["half_res"],
        lr=1e-3,
        steps=10**6,
        validate_every=args.validate_every,
        checkpoint_every=10**6,
        schedule=schedule,
        device=args.device,
        seed=0,
    )
    budget = args.minutes * 60

    def stop_when_spent(step: int, row: dict) -> None:
        if row["seconds"] >= budget and "val_dice" in row:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        result = train(config, data, out / name.replace(" ", "_").replace(",", ""), val, progress=stop_when_spent)
        return result.history
    except TrainingInterrupted:
        from voxreg.training.trainer import _read_metrics

        return _read_metrics(out / name.replace(" ", "_").replace(",", "") / "metrics.csv", 10**9)


def time_to_reach(rows: list[dict], target: float) -> float | None:
    """Training seconds at the first validation with Dice >= target (None if never)."""
    for r in rows:
        if r.get("val_dice", -1) >= target:
            return r["seconds"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train", type=Path)
    parser.add_argument("val", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--coarse-steps", type=int, default=600)
    parser.add_argument("--validate-every", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    scans, labels = scan_list([args.train])
    data = TrainingSet.from_paths(scans, labels)
    val_scans, val_labels = scan_list([args.val])
    val = TrainingSet.from_paths(val_scans, val_labels, shape=data.shape)
    histories = {name: run(name, opts, data, val, args.output, args) for name, opts in RUNS.items()}
    curves = {
        name: [(r["seconds"], r["val_dice"], r["step"]) for r in rows if "val_dice" in r]
        for name, rows in histories.items()
    }
    reference = max(d for _, d, _ in curves["full-res field"])
    target = 0.98 * reference
    lines = [
        f"Grid {'x'.join(map(str, data.shape))}, {len(data)} training scans, {len(val.validation_pairs())} "
        f"validation pairs, budget {args.minutes:g} min each, validation every {args.validate_every} steps.",
        "",
        f"| run | steps | s/step | best val Dice | time to reach 98 % of the full-res field's best ({target:.3f}) |",
        "|---|---|---|---|---|",
    ]
    for name, points in curves.items():
        rows = histories[name]
        reach = time_to_reach(rows, target)
        lines.append(
            f"| {name} | {rows[-1]['step']} | {rows[-1]['seconds'] / rows[-1]['step']:.3f} | "
            f"{max(d for _, d, _ in points):.3f} | {f'{reach / 60:.1f} min' if reach else 'not reached'} |"
        )
    (args.output / "resolution_schedule.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(curves, args.output / "resolution_schedule.png", args)


def plot(curves: dict, path: Path, args) -> None:
    """Validation Dice against training minutes, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        t, d, _ = np.array(points).T
        ax.plot(t / 60, d, ".-", label=name)
    if args.coarse_steps:
        ax.set_title(f"coarse-to-fine: first {args.coarse_steps} steps at 1/2 grid", fontsize=9)
    ax.set_xlabel("training time (min, this CPU)")
    ax.set_ylabel("validation Dice (mean over labels and pairs)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
