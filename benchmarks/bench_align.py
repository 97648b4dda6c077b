"""Time instance optimisation (voxreg.align) at 160x192x224 on this machine.

Uses the lapirn OASIS pair from ../shared/data when present, otherwise a synthetic MNI152
pair resampled to the requested shape. Prints seconds per pyramid level and in total.

Usage: python benchmarks/bench_align.py [--shape 160 192 224] [--device auto] [--similarity ncc] [--threads 0]

``--threads 0`` (default, ``AlignConfig.threads``) lets each level pick 1 or all torch threads
by timing one step of each; N fixes the count.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from voxreg import io
from voxreg.core import spatial, synthetic
from voxreg.io import templates
from voxreg.registration import pipeline as api
from voxreg.registration.instance import AlignConfig, align

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_pair(data: Path, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    folder = data / "brain_mri" / "lapirn_oasis_aligned_pair"
    if folder.exists():
        fixed = io.load_image(folder / "image_A_fullsize.nii.gz")
        moving = io.load_image(folder / "image_B_fullsize.nii.gz")
        source = "lapirn OASIS pair"
    else:
        pair = synthetic.make_synthetic_pair(templates.mni152_template(1), max_displacement=5.0)
        fixed, moving, source = pair.fixed, pair.moving, "synthetic MNI152 pair"
    tensors = [torch.from_numpy(io.normalize_intensity(img.array))[None, None].to(device) for img in (fixed, moving)]
    return (*[spatial.resize_image(t, shape) for t in tensors], source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[160, 192, 224])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--similarity", default="ncc")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=0, help="AlignConfig.threads (0 = auto per level)")
    args = parser.parse_args()
    device = api.resolve_device(args.device)
    fixed, moving, source = load_pair(args.data, tuple(args.shape), device)
    config = AlignConfig(similarity=args.similarity, threads=args.threads)
    print(
        f"{source} at {tuple(args.shape)} on {device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    total = 0.0
    for scale, iterations in zip(config.scales, config.iterations):
        level = AlignConfig(**{**config.__dict__, "scales": (scale,), "iterations": (iterations,)})
        start = time.perf_counter()
        align(fixed, moving, level)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        total += seconds
        print(
            f"  level 1/{scale}: {iterations:4d} steps  {seconds:7.2f} s  ({1000 * seconds / max(iterations, 1):.0f} ms/step)"
        )
    print(f"  total {total:.2f} s for {config.total_iterations} steps ({config.similarity})")


if __name__ == "__main__":
    main()
