"""Time one network registration (forward pass + warp) of VoxelMorph variants.

Each variant runs in its own subprocess so that the reported peak RSS
(``resource.getrusage``) belongs to that variant alone. Weights are random: only
speed and memory are measured.

    python benchmarks/bench_network.py --shape 160 192 224 --repeats 3
    python benchmarks/bench_network.py --variants vm2-half --bf16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from voxreg.core import spatial
from voxreg.nn import NetworkConfig, VoxelMorph

VARIANTS = {
    "vm1": lambda nd: NetworkConfig.vm1(nd),
    "vm2": lambda nd: NetworkConfig.vm2(nd),
    "vm1-half": lambda nd: NetworkConfig.vm1(nd, half_res=True),
    "vm2-half": lambda nd: NetworkConfig.vm2(nd, half_res=True),
    "vm2-diff": lambda nd: NetworkConfig.vm2(nd, int_steps=7),
    "vm2-diff-half": lambda nd: NetworkConfig.vm2(nd, int_steps=7, half_res=True),
}
DEFAULT_VARIANTS = ["vm1", "vm2", "vm2-half", "vm2-diff-half"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs="+", default=[160, 192, 224], help="spatial shape (2 or 3 ints)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = one per core)")
    p.add_argument(
        "--no-channels-last",
        action="store_true",
        help="keep 3D CPU convs in contiguous format (default: channels_last_3d)",
    )
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the U-Net convs")
    p.add_argument("--no-mkldnn", action="store_true", help="disable torch.backends.mkldnn")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    """Time ``model.register`` for one variant in this process; return a result row."""
    device = pick_device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.backends.mkldnn.enabled = not args.no_mkldnn
    shape = tuple(args.shape)
    model = VoxelMorph(VARIANTS[variant](len(shape))).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    moving = torch.rand(1, 1, *shape, generator=gen).to(device)
    fixed = torch.rand(1, 1, *shape, generator=gen).to(device)
    model.channels_last = not args.no_channels_last
    times, cpu_times = [], []
    for i in range(args.repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            field = model.predict_field(moving, fixed, bf16=args.bf16)
            warped = spatial.warp(moving, field)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    assert warped.shape == moving.shape and field.shape[2:] == moving.shape[2:]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    row = {
        "variant": variant,
        "ms_min": 1000 * min(times),
        "ms_mean": 1000 * sum(times) / len(times),
        "cpu_ms_min": 1000 * min(cpu_times),
        "peak_rss_mb": peak_rss_mb,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def run_isolated(argv: list[str], variant: str) -> dict:
    """Run one variant in a fresh interpreter so its peak RSS is its own."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--variants", variant, "--child"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    print(
        f"shape {tuple(args.shape)}  device {device}  threads {args.threads or os.cpu_count()}  "
        f"channels_last {not args.no_channels_last}  bf16 {args.bf16}  mkldnn {not args.no_mkldnn}  "
        f"repeats {args.repeats}"
    )
    print(
        f"{'variant':<15}{'params':>9}{'ms/pair (min)':>15}{'ms/pair (mean)':>16}"
        f"{'CPU ms (min)':>14}{'peak RSS MB':>13}"
    )
    for r in rows:
        extra = f"{r['peak_cuda_mb']:>12.0f} (CUDA MB)" if "peak_cuda_mb" in r else ""
        print(
            f"{r['variant']:<15}{r['params']:>9}{r['ms_min']:>15.0f}{r['ms_mean']:>16.0f}"
            f"{r['cpu_ms_min']:>14.0f}{r['peak_rss_mb']:>13.0f}{extra}"
        )
    print(
        "ms/pair: wall time of forward + warp under inference_mode; CPU ms: process CPU time "
        "(all threads; on a busy shared machine wall time ~ CPU ms / threads at best)"
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if len(args.shape) not in (2, 3):
        raise SystemExit("--shape needs 2 or 3 ints")
    if args.child:
        print(json.dumps(run_variant(args, args.variants[0])))
        return
    base = [a for a in argv if a != "--child"]
    if "--variants" in base:  # drop the user's variant list; each child gets one
        i = base.index("--variants")
        j = i + 1
        while j < len(base) and not base[j].startswith("--"):
            j += 1
        base = base[:i] + base[j:]
    rows = [run_isolated(base, v) for v in args.variants]
    print_table(rows, args)


if __name__ == "__main__":
    main()
