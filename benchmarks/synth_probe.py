"""Is a synthetically trained network moving at all? Dice of the warped moving label maps
before/after and the mean displacement on fixed-seed synthetic pairs drawn like its training
data (its saved TrainConfig), at the grid scale of its current training stage, for a few
lambdas. A cheap early check before the real-pair one (benchmarks/synth_learning.py).

Usage: python benchmarks/synth_probe.py runs/brain-synth-v1/last.pt [--pairs 4] [--scale 0.5]
"""

from __future__ import annotations

import argparse
import sys

import torch

from voxreg.core import spatial
from voxreg.losses import dice
from voxreg.nn import load_checkpoint
from voxreg.training.config import TrainConfig
from voxreg.training.synth import one_hot
from voxreg.training.synth_data import SynthSource, synth_config_of


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--scale", type=float, default=None, help="grid scale (default: the run's current stage)")
    args = parser.parse_args()
    model, extra = load_checkpoint(args.checkpoint)
    config = TrainConfig.from_dict(extra["train_config"])
    scale = args.scale if args.scale is not None else config.stage_scale(int(extra.get("step", 0)))
    source = SynthSource(synth_config_of(config, model.config.ndim))
    source = source.resized(scale) if scale != 1.0 else source
    print(f"step {extra.get('step')} scale {scale} grid {source.shape}")
    print("| lambda | Dice before | Dice after | mean abs displacement (vox) |\n|---|---|---|---|")
    lams = [None] if not model.config.lambda_conditional else [0.1, 1.0, 10.0]
    for lam in lams:
        generator = torch.Generator().manual_seed(123)
        before = after = magnitude = 0.0
        for _ in range(args.pairs):
            pair = source.batch(1, generator)
            k = pair.num_labels
            with torch.no_grad():
                field = model(pair.moving, pair.fixed, lam=None if lam is None else torch.tensor([lam])).field
            target = one_hot(pair.fixed_labels, k)[:, 1:]
            before += float(dice(target, one_hot(pair.moving_labels, k)[:, 1:]))
            after += float(dice(target, spatial.warp(one_hot(pair.moving_labels, k), field)[:, 1:]))
            magnitude += float(field.abs().mean())
        n = args.pairs
        print(f"| {lam} | {before / n:.3f} | {after / n:.3f} | {magnitude / n:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
