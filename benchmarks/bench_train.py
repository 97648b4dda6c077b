"""Training speed and memory: steps/s and peak memory of one VoxelMorph training step
(forward, NCC + grad loss, backward, Adam) at 160x192x224 and at half resolution (80x96x112).

Each configuration runs in a fresh process (so peak resident memory is its own), on random
smooth volumes (speed does not depend on content): 1 warm-up step, then ``--steps`` timed.
On CUDA the peak is ``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS.

Usage: python benchmarks/bench_train.py [--device cpu|cuda] [--steps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

CONFIGS = [
    # (grid, network options, label)
    ((160, 192, 224), {"half_res": False}, "VM-2, full-res field"),
    ((160, 192, 224), {"half_res": False, "grad_checkpoint": True}, "VM-2, full-res field, grad checkpointing"),
    ((160, 192, 224), {"half_res": True}, "VM-2, half-res field"),
    ((160, 192, 224), {"half_res": True, "grad_checkpoint": True}, "VM-2, half-res field, grad checkpointing"),
    ((80, 96, 112), {"half_res": False}, "VM-2, full-res field"),
    ((80, 96, 112), {"half_res": True}, "VM-2, half-res field"),
]


def run_one(shape: tuple[int, ...], options: dict, device: str, steps: int, amp: bool) -> dict:
    """Time ``steps`` training steps in this process; return the figures."""
    import torch

    from voxreg.core.runtime import configure_allocator
    from voxreg.training import TrainConfig, TrainingSet
    from voxreg.training.distributed import Dist
    from voxreg.training.objective import Objective
    from voxreg.training.trainer import _new_session, _train_step

    configure_allocator()
    dev = torch.device(device)
    config = TrainConfig(
        network="vm2",
        half_res=options.get("half_res", False),
        device=device,
        grad_checkpoint=options.get("grad_checkpoint", False),
        amp=amp,
        lr=1e-4,
    )
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(1, 1, *[s // 8 for s in shape], generator=gen)
    images = torch.nn.functional.interpolate(base.repeat(2, 1, 1, 1, 1), size=shape, mode="trilinear")
    images[1] = images[1].roll(3, dims=1)
    data = TrainingSet(images)
    session = _new_session(config, 3, dev, Dist())
    objective = Objective(config, 0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _train_step(session, config, data, objective, dev)
    times = []
    for _ in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _train_step(session, config, data, objective, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "seconds_per_step": sorted(times)[len(times) // 2],
        "peak_memory_mb": peak,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="bf16 mixed precision (CUDA)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:  # child process: one configuration
        shape, options, _ = CONFIGS[int(args.one)]
        print(json.dumps(run_one(shape, options, args.device, args.steps, args.amp)))
        return
    print("| grid | network | s/step | steps/s | peak memory (MB) |\n|---|---|---|---|---|")
    for index, (shape, _, label) in enumerate(CONFIGS):
        cmd = [sys.executable, __file__, "--one", str(index), "--device", args.device, "--steps", str(args.steps)]
        out = subprocess.run(cmd + (["--amp"] if args.amp else []), capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {'x'.join(map(str, shape))} | {label} | failed: {out.stderr.strip().splitlines()[-1]} | | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {'x'.join(map(str, shape))} | {label} | {r['seconds_per_step']:.2f} | "
            f"{1 / r['seconds_per_step']:.3f} | {r['peak_memory_mb']:.0f} |",
            flush=True,
        )
    print(f"\n{args.device}, {r.get('threads')} threads, python {platform.python_version()}")


if __name__ == "__main__":
    main()
