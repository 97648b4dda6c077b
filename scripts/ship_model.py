"""Ship the brain model: write a training checkpoint into the package (src/voxreg/models/) as
``brain.pt`` (weights in half precision, network config and model space, no optimiser state)
with its card ``brain.json``, the default of ``voxreg register`` for 3D scans.

The card records what the run was (steps, wall time from the run's metrics CSV, data and
licences), what the model covers and its default refinement (both measured, see
docs/models.md), and the headline measurements given with ``--measured KEY=VALUE``.

Usage: python scripts/ship_model.py runs/brain-real-v2/work/step_N.pt --metrics runs/brain-real-v2/work/metrics.csv
       [--refine 20] [--refine-lambda 0.5] [--measured dice_model=0.52 ...]
       [--name brain-real --network-only] [--symmetric] [--step-offset N] [--gpu-after STEP]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gzip
import sys
from pathlib import Path

from voxreg.nn import load_checkpoint
from voxreg.nn.shipped import export_shipped

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "src" / "voxreg" / "models"
MAX_SHIPPED_MB = 25.0

CARD = {
    "name": "brain",
    "description": (
        "brain MRI (brain-extracted T1w), inter-subject, after the affine stage "
        "(VoxelMorph VM-2 with a full-resolution branch, trained on real scans)"
    ),
    "anatomy": "brain",
    "modality": "MRI T1-weighted, brain-extracted (synthetic random contrasts in its first stage)",
    "ndim": 3,
    "default": True,
    # refinement steps after the network by default: the shortest refinement whose Dice
    # matched instance optimisation on held-out pairs (docs/models.md, "Default refinement")
    "refine": 20,
    # the refinement's λ when the user gives no --lambda (NCC): 0.5 beat 1 and 2 at every
    # length on the 8 held-out pairs (docs/models.md, "Default refinement")
    "refine_lambda": 0.5,
    # scans the default engine sends to this model: brain-sized fields of view at up to
    # about twice the model's 2.07 mm voxels; others fall back to instance optimisation
    "covers": {"max_spacing_mm": 4.0, "max_extent_mm": 300.0},
    "architecture": (
        "VoxelMorph VM-2 U-Net: half-resolution stationary velocity plus a full-resolution correction "
        "branch (16 channels), integrated on the 2.07 mm model grid by 5 squaring steps; fixed lambda 1"
    ),
    "training_data": (
        "stage 1 (brain-synth-v1, 13,387 steps): synthetic pairs from the MNI152 ICBM 2009a tissue maps of the "
        "nilearn wheel and random shapes; stage 2 (brain-real-v2): unsupervised random scan-to-scan pairs "
        "(local NCC + lambda |grad v|^2) of 64 brain-extracted T1w scans of OpenNeuro ds002748 v1.0.5 "
        "(sub-01..sub-64; sub-65..72 held out), copies from GitHub aaronsossin/DepressionMRI_AI "
        "@baa0d5f0b80425a8d55f5210d609c7773f7570a4, affine-aligned to MNI152 by scripts/prepare_ds002748.py"
    ),
    "licences": (
        "OpenNeuro ds002748 (Bezmaternykh et al., Neural Plasticity 2021, doi:10.1155/2021/8846097; "
        "doi:10.18112/openneuro.ds002748.v1.0.5): CC0. MNI152 ICBM 2009a: Copyright (C) 1993-2009 Louis Collins, "
        "McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University (use, copy and "
        "redistribution with this notice); nilearn: BSD-3; random shapes: generated. Never trained on "
        "../shared/data (used for validation only)."
    ),
    "card": "docs/models.md",
}


def run_summary(metrics_csv: Path, step: int) -> tuple[int, float]:
    """(last step, total wall hours) of a run's metrics CSV up to ``step`` (the checkpoint's);
    its ``seconds`` column carries on across resumes, and if it ever restarts the wall time
    is the sum of each segment's last value."""
    opener = gzip.open if metrics_csv.suffix == ".gz" else open
    with opener(metrics_csv, "rt", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]
    total, previous = 0.0, 0.0
    for row in rows:
        seconds = float(row["seconds"])
        if seconds < previous:
            total += previous
        previous = seconds
    return int(rows[-1]["step"]), (total + previous) / 3600


def _hours_by_device(metrics_csv: Path, hours: float, gpu_after: int | None) -> dict[str, float | str]:
    """Card entries for the run's wall time: all CPU, or CPU up to step ``gpu_after`` and GPU after it."""
    if gpu_after is None:
        return {"training_wall_hours_cpu": round(hours, 2)}
    cpu_hours = run_summary(metrics_csv, gpu_after)[1]
    return {
        "training_wall_hours_cpu": round(cpu_hours, 2),
        "training_wall_hours_gpu": round(hours - cpu_hours, 2),
        "training_devices": f"steps 1..{gpu_after} on a 2-core CPU (batch 1), later steps on one NVIDIA H200 (batch 4)",
    }


def _value(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--metrics", type=Path, required=True, help="the run's metrics CSV, plain or .gz (all steps)")
    parser.add_argument("--measured", nargs="*", default=[], help="KEY=VALUE measurements for the card")
    parser.add_argument("--refine", type=int, default=CARD["refine"], help="default refinement steps (measured)")
    parser.add_argument("--refine-lambda", type=float, default=CARD["refine_lambda"], help="refinement λ (measured)")
    parser.add_argument("--name", default=CARD["name"], help="shipped model name (brain: the default engine's)")
    parser.add_argument(
        "--network-only",
        action="store_true",
        help="the model of --engine network (card network_default; not the default engine's, no refinement)",
    )
    parser.add_argument("--symmetric", action="store_true", help="card symmetric_inference (measured)")
    parser.add_argument(
        "--step-offset", type=int, default=0, help="steps of the run before the checkpoint's segment (--init)"
    )
    parser.add_argument(
        "--gpu-after",
        type=int,
        default=None,
        help="the run's steps after this one ran on a GPU (card: hours per device)",
    )
    args = parser.parse_args()
    extra = load_checkpoint(args.checkpoint)[1]
    if "model_space" not in extra:
        sys.exit(f"{args.checkpoint}: no model space recorded; a shipped model must carry one")
    steps, hours = run_summary(args.metrics, int(extra["step"]) + args.step_offset)
    card = {**CARD, "name": args.name, "refine": args.refine, "refine_lambda": args.refine_lambda}
    if args.network_only:
        card = {key: value for key, value in card.items() if key not in ("default", "refine", "refine_lambda")}
        card |= {"network_default": True, "description": f"{CARD['description']}; the network alone (--engine network)"}
    if args.symmetric:
        card["symmetric_inference"] = True
    card = {
        **card,
        "training_steps": steps,
        **_hours_by_device(args.metrics, hours, args.gpu_after),
        "model_space": extra["model_space"],
        "shipped": datetime.date.today().isoformat(),
        "measured": {key: _value(value) for key, value in (item.split("=", 1) for item in args.measured)},
    }
    path = export_shipped(args.checkpoint, MODELS, card, half=True)
    total = sum(p.stat().st_size for p in MODELS.glob("*.pt")) / 1e6
    print(
        f"{path}: {path.stat().st_size / 1e6:.2f} MB (all shipped models {total:.2f} MB), step {steps}, {hours:.2f} h"
    )
    if total > MAX_SHIPPED_MB:
        sys.exit(f"shipped models take {total:.1f} MB, over the {MAX_SHIPPED_MB} MB budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
