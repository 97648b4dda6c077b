"""Ship the brain model: write a training checkpoint into the package (src/voxreg/models/) as
``brain.pt`` (weights in half precision, network config and model space, no optimiser state)
with its card ``brain.json``, the default of ``voxreg register`` for 3D scans.

The card records what the run was (steps, wall time from the run's metrics CSV, data and
licences), what the model covers and its default refinement (both measured, see
docs/models.md), and the headline measurements given with ``--measured KEY=VALUE``.

Usage: python scripts/ship_model.py runs/brain-synth-v1/weights.pt --metrics runs/brain-synth-v1/work/metrics.csv
       [--measured dice_model=0.52 ...]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
from pathlib import Path

from voxreg.nn import load_checkpoint
from voxreg.nn.shipped import export_shipped

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "src" / "voxreg" / "models"
MAX_SHIPPED_MB = 25.0

CARD = {
    "name": "brain",
    "description": "brain MRI, inter-subject, after the affine stage (VoxelMorph VM-2, synthetic training data)",
    "anatomy": "brain",
    "modality": "MRI (trained on T1-like and random-contrast synthetic pairs)",
    "ndim": 3,
    "default": True,
    # refinement steps after the network by default (4/5 at half, 1/5 at full resolution):
    # the shortest refinement whose Dice matched instance optimisation on held-out pairs
    # (benchmarks/refine_schedule.py, docs/models.md)
    "refine": 40,
    # scans the default engine sends to this model: brain-sized fields of view at up to
    # about twice the model's 2.07 mm voxels; others fall back to instance optimisation
    "covers": {"max_spacing_mm": 4.0, "max_extent_mm": 300.0},
    "architecture": "VoxelMorph VM-2 U-Net, half-resolution stationary velocity field, 5 squaring steps, fixed lambda 1",
    "training_data": (
        "synthetic pairs only (voxreg train --synth brain:0.8,shapes:0.2): MNI152 ICBM 2009a tissue maps and T1 "
        "from the nilearn wheel, deformed into new anatomies, random Gaussian-mixture contrasts; random shapes"
    ),
    "licences": (
        "MNI152 ICBM 2009a: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal "
        "Neurological Institute, McGill University (use, copy and redistribution with this notice); nilearn: BSD-3; "
        "random shapes: generated. Never trained on ../shared/data or any patient scan."
    ),
    "card": "docs/models.md",
}


def run_summary(metrics_csv: Path, step: int) -> tuple[int, float]:
    """(last step, total wall hours) of a run's metrics CSV up to ``step`` (the checkpoint's);
    its ``seconds`` column carries on across resumes, and if it ever restarts the wall time
    is the sum of each segment's last value."""
    with open(metrics_csv, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]
    total, previous = 0.0, 0.0
    for row in rows:
        seconds = float(row["seconds"])
        if seconds < previous:
            total += previous
        previous = seconds
    return int(rows[-1]["step"]), (total + previous) / 3600


def _value(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--metrics", type=Path, required=True, help="the run's metrics CSV (all steps)")
    parser.add_argument("--measured", nargs="*", default=[], help="KEY=VALUE measurements for the card")
    args = parser.parse_args()
    extra = load_checkpoint(args.checkpoint)[1]
    if "model_space" not in extra:
        sys.exit(f"{args.checkpoint}: no model space recorded; a shipped model must carry one")
    steps, hours = run_summary(args.metrics, int(extra["step"]))
    card = {
        **CARD,
        "training_steps": steps,
        "training_wall_hours_cpu": round(hours, 2),
        "model_space": extra["model_space"],
        "shipped": datetime.date.today().isoformat(),
        "measured": {key: _value(value) for key, value in (item.split("=", 1) for item in args.measured)},
    }
    path = export_shipped(args.checkpoint, MODELS, card, half=True)
    total = sum(p.stat().st_size for p in MODELS.glob("*.pt")) / 1e6
    print(f"{path}: {path.stat().st_size / 1e6:.2f} MB (all shipped models {total:.2f} MB), step {steps}, {hours:.2f} h")
    if total > MAX_SHIPPED_MB:
        sys.exit(f"shipped models take {total:.1f} MB, over the {MAX_SHIPPED_MB} MB budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
