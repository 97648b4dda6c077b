"""Profile one instance-optimisation registration (CPU): where does the time go?

The pair is Mindboggle OASIS-TRT-20 subject 2 -> 1 after voxreg's affine stage (exactly the
tensors ``voxreg.register`` hands to the deformable stage), or, without the data, a synthetic
smooth 160x192x224 pair. One ``align()`` call with the default AlignConfig runs under
torch.profiler (CPU, one profiler per pyramid level, switched by the progress callback) and
cProfile at once. voxreg's spatial/NCC helpers are wrapped in ``record_function`` ranges by
this script (monkeypatching; nothing in src/ changes) so that forward time can be attributed;
backward time is attributed by the autograd node names.

Prints: the top operators by self CPU time (all levels), the top Python functions by own time
(cProfile), and per pyramid level: steps, seconds per step, and the share of the level's wall
time spent in the local-NCC box filter (avg_pool3d forward + backward), the warp
(grid_sample forward + backward), grid building (identity + field, normalisation to a
grid_sample grid), scaling and squaring, and the backward pass.

    python benchmarks/profile_instance.py [--threads N] [--synthetic] [--top 10] [--no-torch-profiler]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io as _io
import os
import pstats
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from voxreg import io
from voxreg.core import spatial
from voxreg.losses import modules as loss_modules
from voxreg.losses import similarity
from voxreg.registration import instance
from voxreg.registration import pipeline as api
from voxreg.registration.instance import AlignConfig

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# (module, attribute, range name): forward ranges
WRAPPED = [
    (spatial, "warp", "warp"),
    (spatial, "integrate_velocity", "scaling_squaring"),
    (spatial, "resize_field", "resize_field"),
    (spatial, "voxel_to_normalized", "grid_build"),
    (spatial, "identity_grid", "grid_build_identity"),
    (similarity, "box_filter", "ncc_box_filter"),
    (loss_modules, "local_ncc", "local_ncc"),
]


def instrument() -> None:
    for module, name, label in WRAPPED:
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapper(*args, __original=original, __label=f"voxreg::{label}", **kwargs):
            with record_function(__label):
                return __original(*args, **kwargs)

        setattr(module, name, wrapper)


def load_pair(data: Path, synthetic: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    folder = data / "brain_mri" / "mindboggle_oasis_trt20"
    fixed, moving = (folder / f"OASIS-TRT-20-{n}" / "t1weighted_brain.nii.gz" for n in (1, 2))
    if fixed.exists() and moving.exists() and not synthetic:
        t0 = time.perf_counter()
        result = api.register(fixed, moving, affine_only=True, metrics=False, device="cpu")
        tensors = [
            torch.from_numpy(np.ascontiguousarray(io.normalize_intensity(img.array), dtype=np.float32))[None, None]
            for img in (result.fixed, result.moving)
        ]
        return (
            *tensors,
            f"Mindboggle 2 -> 1 after voxreg affine ({time.perf_counter() - t0:.1f} s), grid {result.fixed.shape}",
        )
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check import smooth_random_pair

    f, m = smooth_random_pair((160, 192, 224), "cpu")
    return f, m, "synthetic smooth pair 160x192x224"


class LevelProfiler:
    """Progress callback that records step times and runs one torch profiler per level."""

    def __init__(self, config: AlignConfig, enabled: bool):
        self.bounds = list(np.cumsum(config.iterations))
        self.enabled = enabled
        self.profilers: list = []
        self.step_times: list[float] = []
        self.level_start: list[float] = []
        self._start_level()

    def _start_level(self) -> None:
        self.level_start.append(time.perf_counter())
        if self.enabled:
            prof = profile(activities=[ProfilerActivity.CPU])
            prof.start()
            self.profilers.append(prof)

    def __call__(self, done: int, total: int) -> None:
        self.step_times.append(time.perf_counter())
        if done in self.bounds:
            if self.enabled:
                self.profilers[-1].stop()
            if done < total:
                self._start_level()


def summarise(prof) -> dict[str, dict[str, float]]:
    """name -> {'self_us', 'total_us', 'count'} for one profiler."""
    out: dict[str, dict[str, float]] = {}
    for ev in prof.key_averages():
        out[ev.key] = {"self_us": ev.self_cpu_time_total, "total_us": ev.cpu_time_total, "count": ev.count}
    return out


def _self(stats: dict, predicate) -> float:
    return sum(v["self_us"] for k, v in stats.items() if predicate(k)) / 1e6


def _total(stats: dict, key: str) -> float:
    return stats.get(key, {}).get("total_us", 0.0) / 1e6


def level_shares(stats: dict) -> dict[str, float]:
    """Seconds per category for one level (forward ranges are inclusive; backward by node)."""
    bwd = "autograd::engine::evaluate_function: "
    return {
        "box filter (avg_pool3d fwd+bwd)": _self(stats, lambda k: "avg_pool3d" in k),
        "local NCC fwd (incl. box filter)": _total(stats, "voxreg::local_ncc"),
        "grid_sample fwd+bwd": _self(stats, lambda k: "grid_sampler" in k),
        "grid building fwd": _total(stats, "voxreg::grid_build") + _total(stats, "voxreg::grid_build_identity"),
        "scaling & squaring fwd": _total(stats, "voxreg::scaling_squaring"),
        "warp of the image fwd (incl. grid)": _total(stats, "voxreg::warp"),
        "backward (all autograd nodes)": sum(v["total_us"] for k, v in stats.items() if k.startswith(bwd)) / 1e6,
        "Adam step": _total(stats, "Optimizer.step#Adam.step"),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--synthetic", action="store_true", help="synthetic 160x192x224 pair even with the data")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--no-torch-profiler", action="store_true", help="cProfile and step times only")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fixed, moving, source = load_pair(args.data, args.synthetic)
    config = AlignConfig()
    box = instance.foreground_box(fixed, moving, threshold=config.foreground_threshold or 0.01)
    crop = tuple(s.stop - s.start for s in box)
    print(f"{source}; foreground box {crop} ({np.prod(crop) / np.prod(fixed.shape[2:]):.0%} of the grid)")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} "
        f"(shared CPU: timings include other jobs)"
    )
    instrument()
    levels = LevelProfiler(config, enabled=not args.no_torch_profiler)
    cprof = cProfile.Profile()
    t0 = time.perf_counter()
    cprof.enable()
    instance.align(fixed, moving, config, progress=levels)
    cprof.disable()
    wall = time.perf_counter() - t0
    print(f"align(): {wall:.1f} s for {config.total_iterations} steps (profilers on)\n")

    # per level
    ends = [levels.step_times[b - 1] for b in levels.bounds]
    level_stats = [summarise(pr) for pr in levels.profilers]
    print("| level | grid | steps | s/step | level s | " + " | ".join(level_shares({}).keys()) + " |")
    print("|---" * (5 + len(level_shares({}))) + "|")
    for i, (scale, steps) in enumerate(zip(config.scales, config.iterations)):
        seconds = ends[i] - levels.level_start[i]
        shape = "x".join(str(max(2, s // scale)) for s in crop)
        cells = ""
        if level_stats:
            shares = level_shares(level_stats[i])
            cells = " | ".join(f"{100 * v / seconds:.0f} % ({v:.1f} s)" for v in shares.values())
        print(f"| 1/{scale} | {shape} | {steps} | {seconds / steps:.3f} | {seconds:.1f} | {cells} |")

    if level_stats:
        merged: dict[str, dict[str, float]] = defaultdict(lambda: {"self_us": 0.0, "count": 0})
        for stats in level_stats:
            for k, v in stats.items():
                merged[k]["self_us"] += v["self_us"]
                merged[k]["count"] += v["count"]
        total_self = sum(v["self_us"] for v in merged.values())
        print(f"\nTop {args.top} operators by self CPU time (all levels, torch.profiler):")
        print("| operator | self s | share | calls |\n|---|---|---|---|")
        for k, v in sorted(merged.items(), key=lambda kv: -kv[1]["self_us"])[: args.top]:
            print(f"| {k} | {v['self_us'] / 1e6:.2f} | {100 * v['self_us'] / total_self:.1f} % | {v['count']} |")

    buf = _io.StringIO()
    pstats.Stats(cprof, stream=buf).sort_stats("tottime").print_stats(args.top)
    print(f"\nTop {args.top} functions by own time (cProfile):")
    lines = buf.getvalue().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls")), 0)
    print("\n".join(ln for ln in lines[start:] if ln.strip()))


if __name__ == "__main__":
    main()
