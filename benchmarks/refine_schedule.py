"""How long must the refinement after a network be? Mean Dice, folding and seconds of the
network alone, the network + instance-optimisation refinement with several schedules, and
instance optimisation alone, on real held-out Mindboggle pairs (native 1 mm, manual
DKT31+CMA labels, voxreg's affine stage first; computed once per pair and shared by every
variant). The measurement behind the default refinement of the shipped model. Exits cleanly
without ../shared/data (never used for training).

Usage: python benchmarks/refine_schedule.py MODEL [--pairs 2:1 4:3] [--schedules 2:30,1:5 ...]
A schedule is a comma list of pyramid-scale:steps, coarse to fine, optionally /iN for N
scaling-and-squaring steps ("instance" = the default instance optimisation from the affine
alignment, no network).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import voxreg
from synth_learning import DATA, _mean_dice, _subject  # the same held-out pairs and scoring
from voxreg import io, metrics
from voxreg.registration.instance import AlignConfig, align
from voxreg.registration.pipeline import _predict_with_model, resolve_model, warp_image


def _config(schedule: str) -> AlignConfig:
    """``"2:20,1:5"`` -> scales (2, 1), iterations (20, 5); suffixes: ``/i4`` int_steps 4,
    ``/v`` every level optimises the velocity (``residual_levels=0``);
    ``"instance"`` = the default AlignConfig (with the same suffixes)."""
    velocity = schedule.endswith("/v")
    schedule, _, int_steps = schedule.removesuffix("/v").partition("/i")
    extra = {"int_steps": int(int_steps or AlignConfig.int_steps), **({"residual_levels": 0} if velocity else {})}
    if schedule == "instance":
        return AlignConfig(**extra)  # type: ignore[arg-type]
    levels = [level.split(":") for level in schedule.split(",")]
    return AlignConfig(scales=tuple(int(s) for s, _ in levels), iterations=tuple(int(n) for _, n in levels), **extra)  # type: ignore[arg-type]


def _score(field: torch.Tensor, pair: dict, seconds: float) -> tuple[float, float, float]:
    labels = warp_image(pair["moving_labels"], pair["fixed_img"], field, pair["world_matrix"])
    folding = metrics.jacobian_stats(field)["folding_percent"]
    return _mean_dice(pair["truth"], labels.array), folding, seconds


def _prepare(moving_id: int, fixed_id: int) -> dict:
    fixed, fixed_labels = _subject(fixed_id)
    moving, moving_labels = _subject(moving_id)
    affine = voxreg.register(fixed, moving, affine_only=True, metrics=False, device="cpu")
    fixed_img, moving_img = io.load_image(fixed), io.load_image(moving)
    moving_on_fixed = warp_image(moving_img, fixed_img, world_matrix=affine.world_matrix)
    return {
        "fixed_img": fixed_img,
        "moving_on_fixed": moving_on_fixed,
        "world_matrix": affine.world_matrix,
        "affine_seconds": affine.metrics["affine"]["seconds"],
        "moving_labels": io.load_image(moving_labels, label=True),
        "truth": io.load_image(fixed_labels, label=True).array,
        "fixed_t": torch.from_numpy(io.normalize_intensity(fixed_img.array))[None, None].float(),
        "moving_t": torch.from_numpy(io.normalize_intensity(moving_on_fixed.array))[None, None].float(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="checkpoint path or shipped model name")
    parser.add_argument("--pairs", nargs="+", default=["2:1", "4:3"])
    parser.add_argument("--schedules", nargs="+", default=["2:20,1:5", "2:40,1:10", "instance"])
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} not found (real validation data is not shipped with voxreg)")
        return 0
    model = resolve_model(args.model, "network", 3)
    print(f"model {model}; torch threads {torch.get_num_threads()}")
    print("| pair | variant | Dice | folding % | deformable s |")
    print("|---|---|---|---|---|")
    totals: dict[str, list[float]] = {}
    for moving_id, fixed_id in (tuple(int(v) for v in p.split(":")) for p in args.pairs):
        pair = _prepare(moving_id, fixed_id)
        rows = {"affine": _score(torch.zeros(1, 3, *pair["fixed_img"].shape), pair, 0.0)}
        start = time.perf_counter()
        network = _predict_with_model(model, pair["fixed_img"], pair["moving_on_fixed"], None, torch.device("cpu"))
        rows["network"] = _score(network, pair, time.perf_counter() - start)
        for schedule in args.schedules:
            start = time.perf_counter()
            alone = schedule.startswith("instance")
            initial = None if alone else network
            field = align(pair["fixed_t"], pair["moving_t"], _config(schedule), initial_field=initial).field
            seconds = time.perf_counter() - start + (0.0 if alone else rows["network"][2])
            rows[schedule if alone else f"network + {schedule}"] = _score(field, pair, seconds)
        for name, (dice, folding, seconds) in rows.items():
            totals.setdefault(name, []).append(dice)
            print(f"| {moving_id}->{fixed_id} | {name} | {dice:.4f} | {folding:.4f} | {seconds:.1f} |", flush=True)
    print("\nmean Dice over pairs: " + ", ".join(f"{k} {np.mean(v):.4f}" for k, v in totals.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
