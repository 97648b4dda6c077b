"""Is a synthetically trained network moving at all? (port of the retired synth_probe.py). Dice
of the warped moving label maps before/after and the mean displacement on fixed-seed synthetic
pairs drawn like its training data (its saved TrainConfig), at the grid scale of its current
training stage, for a few lambdas. A cheap check before the real pairs (learning_curve.py).
``--quick``: 1 pair at scale 0.25.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks import timing

SUMMARY = "a training checkpoint on synthetic pairs like its training data: Dice before/after, |u|"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the synth-probe suite."""
    parser.add_argument("checkpoint", help="training checkpoint (e.g. runs/brain-synth-v1/last.pt)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--scale", type=float, default=None, help="grid scale (default: the run's current stage)")


def probe(checkpoint: str, pairs: int, scale: float | None) -> dict[str, Any]:
    """Mean Dice before/after and mean |displacement| per lambda (the child's entry point)."""
    import torch

    from voxreg.core import spatial
    from voxreg.losses import dice
    from voxreg.nn import load_checkpoint
    from voxreg.training.config import TrainConfig
    from voxreg.training.synth import one_hot
    from voxreg.training.synth_data import SynthSource, synth_config_of

    model, extra = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict(extra["train_config"])
    scale = scale if scale is not None else config.stage_scale(int(extra.get("step", 0)))
    source = SynthSource(synth_config_of(config, model.config.ndim))
    source = source.resized(scale) if scale != 1.0 else source
    rows = []
    for lam in [None] if not model.config.lambda_conditional else [0.1, 1.0, 10.0]:
        generator = torch.Generator().manual_seed(123)
        before = after = magnitude = 0.0
        for _ in range(pairs):
            pair = source.batch(1, generator)
            k = pair.num_labels
            with torch.no_grad():
                field = model(pair.moving, pair.fixed, lam=None if lam is None else torch.tensor([lam])).field
            target = one_hot(pair.fixed_labels, k)[:, 1:]
            before += float(dice(target, one_hot(pair.moving_labels, k)[:, 1:]))
            after += float(dice(target, spatial.warp(one_hot(pair.moving_labels, k), field)[:, 1:]))
            magnitude += float(field.abs().mean())
        rows.append(
            {"lambda": lam, "dice_before": before / pairs, "dice_after": after / pairs, "mean_abs_u": magnitude / pairs}
        )
    return {"step": extra.get("step"), "scale": scale, "grid": list(source.shape), "rows": rows}


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """The probe in one fresh process."""
    pairs, scale = (1, 0.25) if args.quick else (args.pairs, args.scale)
    kwargs = {"checkpoint": args.checkpoint, "pairs": pairs, "scale": scale}
    return {
        "checkpoint": args.checkpoint,
        **timing.measure_call("benchmarks.suites.synth_probe:probe", kwargs, repeats=1)["value"],
    }


def render(document: dict[str, Any]) -> str:
    """One line per lambda."""
    lines = [
        f"`{document['checkpoint']}`, step {document['step']}, scale {document['scale']}, grid {document['grid']}",
        "",
    ]
    lines += ["| lambda | Dice before | Dice after | mean abs displacement (vox) |", "|---|---|---|---|"]
    for r in document["rows"]:
        lines.append(f"| {r['lambda']} | {r['dice_before']:.3f} | {r['dice_after']:.3f} | {r['mean_abs_u']:.3f} |")
    return "\n".join(lines) + "\n"
