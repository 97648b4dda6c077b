"""How long must the refinement after a network be? (port of the retired refine_schedule.py,
the measurement behind the shipped model's default refinement). Mean Dice, folding and seconds
of the network alone, network + instance-optimisation refinement with several schedules, and
instance optimisation alone, on held-out Mindboggle pairs (native 1 mm, manual labels, voxreg's
affine stage first, shared by every variant). One fresh process.

A schedule is a comma list of pyramid-scale:steps, coarse to fine, or rN (what ``register
--refine N`` runs); "instance" = the default instance optimisation from the affine alignment.
Suffixes: /iN for N scaling-and-squaring steps, /v for the velocity at every level, /lX for
lambda X, /fN for a velocity grid N times coarser than each level's image (2 by default), /sX
for step size (learning rate) X. ``A>B``: schedule A from the affine alignment (no network),
then schedule B (if any) refining A's field, e.g. ``4:60,2:30>1:4/s0.25``: instance optimisation
without its full-resolution level (the best a ~2 mm field reaches; ``4:60,2:30>`` alone), then 4
full-resolution steps: how good a network's start must be for a short refinement.
``--quick``: pair 2->1, schedule 2:2,1:1.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from benchmarks import pairs, timing

SUMMARY = "network + refinement schedules vs instance optimisation on Mindboggle pairs (Dice, folding, s)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the refine-schedule suite."""
    parser.add_argument("--model", default="brain", help="checkpoint path or shipped model name")
    parser.add_argument("--pairs", nargs="+", default=["2:1", "4:3"], help="Mindboggle moving:fixed numbers")
    parser.add_argument("--schedules", nargs="+", default=["2:20,1:5", "2:40,1:10", "instance"])
    parser.add_argument("--symmetric", action="store_true", help="the network averages both directions")


def align_config(schedule: str) -> Any:
    """``"2:20,1:5"`` -> scales (2, 1), iterations (20, 5); ``"rN"`` the refinement ``register
    --refine N`` runs (:meth:`AlignConfig.refinement`); ``"instance"`` the default AlignConfig.
    Suffixes: ``/iN`` int_steps N, ``/v`` residual_levels 0, ``/lX`` lambda X, ``/fN`` field_scale N, ``/sX`` lr X."""
    from voxreg.registration.instance import AlignConfig

    schedule, *suffixes = schedule.split("/")
    extra: dict[str, Any] = {}
    for suffix in suffixes:
        if suffix == "v":
            extra["residual_levels"] = 0
        elif suffix[:1] in ("i", "f"):
            extra["int_steps" if suffix[0] == "i" else "field_scale"] = int(suffix[1:])
        elif suffix[:1] in ("l", "s"):
            extra["lam" if suffix[0] == "l" else "lr"] = float(suffix[1:])
        else:
            raise ValueError(f"unknown schedule suffix /{suffix} in {schedule!r}")
    if schedule == "instance":
        return AlignConfig(**extra)
    if schedule.startswith("r"):
        return AlignConfig(**extra).refinement(int(schedule[1:]))
    levels = [level.split(":") for level in schedule.split(",")]
    return AlignConfig(scales=tuple(int(s) for s, _ in levels), iterations=tuple(int(n) for _, n in levels), **extra)


def schedule_stages(schedule: str) -> tuple[list[Any], bool]:
    """(the AlignConfigs run one after the other, whether the first starts from the affine
    alignment instead of the network): ``"A>B"`` is A from the affine alignment, then B from
    A's field (``"A>"``: A alone); ``"instance..."`` starts from the affine alignment too."""
    first, after, then = schedule.partition(">")
    stages = [align_config(first)] + ([align_config(then)] if then else [])
    return stages, first.startswith("instance") or bool(after)


def inverse_residual(field: Any, fixed: Any) -> dict[str, float]:
    """Mean and 99th percentile (voxels) of ``|u(x) + u_inv(x + u(x))|`` over the fixed scan's
    foreground, ``u_inv`` found as ``voxreg register`` finds it for a composed field
    (:func:`voxreg.registration.outputs.composed_inverse`, polished since 2026-12-05; before 2026-12-04 12:00 the
    fixed-point inversion alone)."""
    from voxreg.core import spatial
    from voxreg.registration.outputs import composed_inverse, foreground_index

    if not bool(field.any()):
        return {"inverse_mean": 0.0, "inverse_p99": 0.0}
    index = foreground_index(fixed)
    inverse = composed_inverse(field, index)[1]
    residual = spatial.inverse_residual(field, inverse, index).numpy()
    return {"inverse_mean": float(residual.mean()), "inverse_p99": float(np.percentile(residual, 99))}


def compare(
    model: str, pair_texts: list[str], schedules: list[str], data: str, symmetric: bool = False
) -> list[dict[str, Any]]:
    """Rows (pair, variant, Dice, folding %, deformable seconds): the child's entry point."""
    import torch

    import voxreg
    from voxreg import io, metrics
    from voxreg.registration.instance import align
    from voxreg.registration.pipeline import _predict_with_model, resolve_model, warp_image

    resolved = resolve_model(model, "network", 3)
    rows = []
    for pair in pairs.parse_pairs(pair_texts, data):
        affine = voxreg.register(pair.fixed, pair.moving, affine_only=True, metrics=False, device="cpu")
        fixed_img, moving_img = io.load_image(pair.fixed), io.load_image(pair.moving)
        moving_on_fixed = warp_image(moving_img, fixed_img, world_matrix=affine.world_matrix)
        labels, truth = (
            io.load_image(pair.moving_labels, label=True),
            io.load_image(pair.fixed_labels, label=True).array,
        )
        tensors = [
            torch.from_numpy(io.normalize_intensity(i.array))[None, None].float() for i in (fixed_img, moving_on_fixed)
        ]

        context = (pair.id, labels, fixed_img, affine.world_matrix, truth)

        def score(name: str, field: Any, seconds: float, context: tuple = context) -> None:
            pair_id, moving_labels, fixed_grid, world, fixed_truth = context
            warped = warp_image(moving_labels, fixed_grid, field, world)
            folding = metrics.jacobian_stats(field)["folding_percent"]
            rows.append({"pair": pair_id, "variant": name, "dice": pairs.mean_dice(fixed_truth, warped.array)})
            rows[-1] |= {"folding_percent": folding, "seconds": seconds} | inverse_residual(field, fixed_grid)

        score("affine", torch.zeros(1, 3, *fixed_img.shape), 0.0)
        start = time.perf_counter()
        cpu = torch.device("cpu")
        network, _ = _predict_with_model(resolved, fixed_img, moving_on_fixed, None, cpu, symmetric=symmetric)
        network_s = time.perf_counter() - start
        score("network", network, network_s)
        for schedule in schedules:
            stages, alone = schedule_stages(schedule)
            start = time.perf_counter()
            field = None if alone else network
            for stage in stages:
                field = align(*tensors, stage, initial_field=field).field
            seconds = time.perf_counter() - start + (0.0 if alone else network_s)
            score(schedule if alone else f"network + {schedule}", field, seconds)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """All pairs and schedules in one fresh process."""
    if args.quick:
        args.pairs, args.schedules = ["2:1"], ["2:2,1:1"]
    if not all(p.exists() for p in pairs.parse_pairs(args.pairs, args.data)):
        print(f"skipped: Mindboggle pairs not found under {args.data}")
        return None
    kwargs = {"model": args.model, "pair_texts": args.pairs, "schedules": args.schedules, "data": str(args.data)}
    kwargs["symmetric"] = bool(args.symmetric)
    rows = timing.measure_call("benchmarks.suites.refine_schedule:compare", kwargs, repeats=1)["value"]
    return {"model": args.model, "symmetric": bool(args.symmetric), "rows": rows}


def render(document: dict[str, Any]) -> str:
    """The mean per variant (Dice, folding, seconds, inverse residual), then one line per pair."""
    rows = document["rows"]
    variants: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        variants.setdefault(r["variant"], []).append(r)
    both_ways = ", symmetric inference" if document.get("symmetric") else ""
    lines = [f"Model: `{document['model']}`{both_ways}, {len({r['pair'] for r in rows})} pairs.", ""]
    lines += [
        "| variant | mean Dice | folding % | deformable s per pair | inverse residual mean / p99 (voxels) |",
        "|---|---|---|---|---|",
    ]
    for name, group in variants.items():
        mean = {
            key: float(np.mean([r.get(key, np.nan) for r in group]))
            for key in group[0]
            if key not in ("pair", "variant")
        }
        lines.append(
            f"| {name} | {mean['dice']:.4f} | {mean['folding_percent']:.4f} | {mean['seconds']:.2f} "
            f"| {mean.get('inverse_mean', float('nan')):.3f} / {mean.get('inverse_p99', float('nan')):.3f} |"
        )
    lines += ["", "Per pair:", "", "| pair | variant | Dice | folding % | deformable s |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['pair']} | {r['variant']} | {r['dice']:.4f} | {r['folding_percent']:.4f} | {r['seconds']:.1f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"
