"""Learning curve of a training run on the 8 held-out Mindboggle pairs (validation only:
../shared may never train weights that ship): mean Dice (labels present in both, 0 and 74
excluded) and % folding of the network alone, and optionally network + refinement, for each
checkpoint given. The affine stage is computed once per pair and reused for every checkpoint.

Usage: python benchmarks/learning_curve.py CKPT.pt ... [--refine 10 20 40] [--passes N] [--instance] [--csv OUT.csv] [--pairs 2:1 4:3]
                                          [--offset STEPS HOURS]   (a segment continued with --init)
       python benchmarks/learning_curve.py --csv CURVE.csv --plot CURVE.png --reference 'ANTs SyN=0.568'   (plot only)
Appends one row per checkpoint to --csv (step, wall hours of training, Dice, folding);
``--instance`` also prints instance optimisation on the same affine-aligned pairs (the
default's target), timed the same way.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

from voxreg import io, metrics
from voxreg.registration import pipeline as api

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain_mri" / "mindboggle_oasis_trt20"
PAIRS = ["2:1", "4:3", "6:5", "8:7", "10:9", "12:11", "14:13", "16:15"]
EXCLUDED = {0, 74}


def subject(number: int) -> tuple[Path, Path]:
    """Brain scan and manual label map of OASIS-TRT-20-<number>."""
    folder = DATA / f"OASIS-TRT-20-{number}"
    return folder / "t1weighted_brain.nii.gz", folder / "labels_DKT31_CMA.nii.gz"


def mean_dice(fixed: np.ndarray, warped: np.ndarray) -> float:
    """Mean Dice over the labels present in both maps, without 0 and 74."""
    labels = sorted((set(np.unique(fixed)) & set(np.unique(warped))) - EXCLUDED)
    return float(np.nanmean(list(metrics.dice_per_label(fixed, warped, labels).values())))


def checkpoint_info(path: Path) -> tuple[int, float]:
    """(training step, training wall hours) stored in a training checkpoint (-1, nan if absent)."""
    extra = torch.load(path, map_location="cpu", weights_only=True).get("extra", {})
    seconds = float(extra.get("seconds", extra.get("elapsed", float("nan"))))
    return int(extra.get("step", -1)), seconds / 3600.0


def evaluate(
    model: Path | None,
    pairs: list[tuple[Path, Path, Path, Path, np.ndarray]],
    refine: int,
    symmetric: bool = False,
    passes: int = 1,
) -> dict[str, float | str]:
    """Mean Dice, % folding and seconds per pair (and each pair's Dice, ``dice_pairs``) of
    ``model`` (+ ``refine`` steps), or of
    instance optimisation when ``model`` is None; seconds = loading, the network (+
    refinement) or the optimisation, and warping scan and labels, with the affine given;
    ``symmetric``: the network averages both directions (``register(symmetric=True)``);
    ``passes``: the network applied that many times (``register(passes=...)``)."""
    dice, folding, seconds = [], [], []
    for fixed, moving, fixed_labels, moving_labels, world in pairs:
        start = time.perf_counter()
        result = api.register(
            fixed,
            moving,
            model=model,
            refine=refine if model is not None else None,
            world_matrix=world,
            moving_labels=[moving_labels],
            metrics=False,
            engine="network" if model is not None else "instance",
            device="cpu",
            symmetric=symmetric if model is not None else None,
            passes=passes if model is not None else None,
        )
        seconds.append(time.perf_counter() - start)  # network (+ refinement) + warps; affine given
        warped = next(iter(result.warped_labels.values())).array
        dice.append(mean_dice(io.load_image(fixed_labels, label=True).array, warped))
        folding.append(float(metrics.jacobian_stats(result.field)["folding_percent"]))
    scores = {"dice": float(np.mean(dice)), "folding": float(np.mean(folding)), "seconds": float(np.mean(seconds))}
    return scores | {"dice_pairs": " ".join(f"{value:.4f}" for value in dice)}


def _rounded(value: float | str) -> float | str:
    """A score to 4 decimals (text as it is)."""
    return round(value, 4) if isinstance(value, float) else value


#: CSV ``device`` tags of segments plotted as series of their own, each starting at its first
#: row (the shipped checkpoint the segment continued from)
LATER_SEGMENTS = {
    "cpu-1mm-l0.5": "CPU, similarity at 1 mm, \u03bb 0.5 (14th)",
    "cpu-1mm-l0.5b": "the same recipe rerun (15th)",
    "cpu-1mm-casc": "trained as a cascade's 2nd pass, half the steps (15th)",
    "cpu-1mm-lr": "lr 1.5e-4, as a cascade's 2nd pass half the steps (16th)",
    "cpu-1mm-w5": "NCC window 5 at 1.035 mm (16th)",
    "cpu-1mm-b4": "batch 4, lr 1e-4 on the CPU (17th)",
}


def plot_curve(rows: list[dict[str, str]], path: Path, references: dict[str, float]) -> None:
    """Dice of the model alone against training steps (and CPU hours on a second axis), with
    horizontal reference lines (e.g. ANTs SyN, instance optimisation)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sorted(rows, key=lambda row: int(row["step"]))
    steps = [int(row["step"]) for row in rows]
    fig = Figure(figsize=(8, 5.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    on_gpu = [row for row in rows if row.get("device") == "gpu"]
    fine = [row for row in rows if row.get("device") == "cpu-1mm"]  # similarity scored at 1 mm
    rows_cpu = [row for row in rows if row.get("device") not in ("gpu", "cpu-1mm", *LATER_SEGMENTS)]
    both_ways = [row for row in rows_cpu if row.get("symmetric") == "True"]
    one_way = [row for row in rows_cpu if row.get("symmetric") != "True"]
    ax.plot([int(r["step"]) for r in one_way], [float(r["model_dice"]) for r in one_way], "o-", label="model alone")
    if both_ways:
        dice = [float(r["model_dice"]) for r in both_ways]
        ax.plot([int(r["step"]) for r in both_ways], dice, "s-", label="model alone, symmetric inference")
    if on_gpu:
        start = [both_ways[-1]] if both_ways else []
        gpu_rows = start + on_gpu
        ax.plot(
            [int(r["step"]) for r in gpu_rows],
            [float(r["model_dice"]) for r in gpu_rows],
            "^-",
            label="symmetric, GPU segment (batch 4)",
        )
    if fine:
        start = [(on_gpu or both_ways)[-1]] if (on_gpu or both_ways) else []
        ax.plot(
            [int(r["step"]) for r in start + fine],
            [float(r["model_dice"]) for r in start + fine],
            "v-",
            label="symmetric, CPU, similarity at 1 mm (--similarity-scale 2)",
        )
    for tag, label in LATER_SEGMENTS.items():  # each from its own first row (the checkpoint it started from)
        segment = [row for row in rows if row.get("device") == tag]
        if segment:
            ax.plot([int(r["step"]) for r in segment], [float(r["model_dice"]) for r in segment], "D-", label=label)
    for (name, value), style in zip(references.items(), ("--", ":", "-.")):
        ax.axhline(value, linestyle=style, color="grey", label=f"{name} {value:.3f}")
    batch_note = " (batch 1 except the series marked batch 4)" if on_gpu else ""
    ax.set_xlabel(f"training steps of this run{batch_note}")
    ax.set_ylabel("mean Dice, 8 Mindboggle pairs")
    hours = [float(row["train_hours"]) for row in rows]
    top = ax.secondary_xaxis(
        "top", functions=(lambda s: np.interp(s, steps, hours), lambda h: np.interp(h, hours, steps))
    )
    top.set_xticks(range(int(max(hours)) + 1))  # whole hours within the run (beyond it the mapping is flat)
    top.set_xlabel("hours of this run (CPU: 2 cores, shared" + ("; then the GPU)" if on_gpu else ")"))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: the curve stays visible
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="*")
    parser.add_argument("--refine", type=int, nargs="*", default=[], help="also evaluate network + N steps, each N")
    parser.add_argument("--instance", action="store_true", help="also print instance optimisation's scores")
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--pairs", nargs="+", default=PAIRS)
    parser.add_argument("--plot", type=Path, help="only plot --csv's rows into this PNG")
    parser.add_argument("--reference", nargs="*", default=[], help="NAME=DICE lines for --plot")
    parser.add_argument(
        "--offset",
        nargs=2,
        type=float,
        default=(0, 0.0),
        metavar=("STEPS", "HOURS"),
        help="added to each checkpoint's step and hours: a run continued with --init counts from 0 again",
    )
    parser.add_argument("--symmetric", action="store_true", help="the network averages both directions")
    parser.add_argument("--passes", type=int, default=1, help="the network applied N times (register --passes)")
    args = parser.parse_args()
    if args.plot:
        refs = {k: float(v) for k, v in (item.split("=", 1) for item in args.reference)}
        plot_curve(list(csv.DictReader(args.csv.open())), args.plot, refs)
        return
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: not found (../shared/data is needed for this benchmark)")
    pairs = []
    for text in args.pairs:
        moving_no, fixed_no = (int(v) for v in text.split(":"))
        (fixed, fixed_labels), (moving, moving_labels) = subject(fixed_no), subject(moving_no)
        world = api.register(fixed, moving, affine_only=True, metrics=False).world_matrix
        pairs.append((fixed, moving, fixed_labels, moving_labels, world))
    if args.instance:
        scores = evaluate(None, pairs, 0)
        print(
            {"method": "instance-optimisation", **{key: _rounded(value) for key, value in scores.items()}}, flush=True
        )
    for path in args.checkpoints:
        step, hours = checkpoint_info(path)
        step, hours = step + int(args.offset[0]), hours + args.offset[1]
        row: dict[str, object] = {"checkpoint": path.name, "step": step, "train_hours": round(hours, 3)}
        row["symmetric"] = args.symmetric
        if args.passes != 1:
            row["passes"] = args.passes
        for name, refine in [("model", 0)] + [(f"refine{n}", n) for n in args.refine]:
            scores = evaluate(path, pairs, refine, args.symmetric, args.passes)
            row.update({f"{name}_{key}": _rounded(value) for key, value in scores.items()})
        print(row, flush=True)
        if args.csv:
            new = not args.csv.exists()
            with args.csv.open("a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(row))
                if new:
                    writer.writeheader()
                writer.writerow(row)


if __name__ == "__main__":
    main()
