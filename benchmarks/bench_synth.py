"""Speed of the synthetic pair generator (``voxreg.training.synth``) against a training step.

For each shape and label source: one warm-up pair (its time, which includes one-off set-up
such as the MNI parcellation, is reported as ``first s``), then ``--repeats`` timed pairs of
batch ``--batch``. For comparison, one VoxelMorph (VM-2) training step (forward, MSE + grad
loss, backward, Adam) on a synthetic pair of the same shape, when the network imports.

    python benchmarks/bench_synth.py                      # 64x80x64 and 96x112x96, 2 threads
    python benchmarks/bench_synth.py --shapes 96x112x96 --repeats 10 --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from voxreg.core import spatial
from voxreg.training.synth import SynthConfig, SynthGenerator, random_shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["64x80x64", "96x112x96"], help="e.g. 64x80x64 or 96x112")
    p.add_argument("--sources", nargs="+", default=["shapes", "brain", "user", "mixed"])
    p.add_argument("--repeats", type=int, default=5, help="timed pairs after one warm-up")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--no-network", action="store_true", help="skip the training-step comparison")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _user_maps(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Two label maps with arbitrary codes (made on the fly, no files read)."""
    labels = random_shapes(2, shape, 20, torch.Generator().manual_seed(123))
    return [(m[0].numpy() * 1009 + 7) for m in labels]


def time_source(
    shape: tuple[int, ...], source: str, args: argparse.Namespace, device: torch.device
) -> tuple[float, float]:
    """(first-pair seconds, mean seconds per batch) for one source."""
    weights = {"mixed": {"shapes": 1.0, "brain": 1.0, "user": 1.0}}.get(source, {source: 1.0})
    maps = _user_maps(shape) if "user" in weights else None
    config = SynthConfig(shape=shape, sources=weights)
    gen = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    generator = SynthGenerator(config, label_maps=maps, device=device)
    generator.sample(args.batch, gen)
    _sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.repeats):
        generator.sample(args.batch, gen)
    _sync(device)
    return first, (time.perf_counter() - start) / args.repeats


def time_training_step(shape: tuple[int, ...], device: torch.device, repeats: int) -> float | None:
    """Seconds of one VM-2 training step at ``shape`` (batch 1), or None if unavailable."""
    from voxreg.nn import NetworkConfig, VoxelMorph

    model = VoxelMorph(NetworkConfig(ndim=len(shape))).to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = SynthGenerator(SynthConfig(shape=shape, sources={"shapes": 1.0}), device=device).sample(
        1, torch.Generator(device=device).manual_seed(0)
    )

    def step() -> None:
        field = model(batch.moving, batch.fixed).field
        loss = (spatial.warp(batch.moving, field) - batch.fixed).square().mean()
        for axis in range(2, field.dim()):
            loss = loss + 0.01 * field.diff(dim=axis).square().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch}, "
        f"{args.repeats} timed batches after 1 warm-up"
    )
    print(f"{'shape':>12} {'source':>8} {'first s':>8} {'s/pair':>8} {'pairs/s':>8}")
    for text in args.shapes:
        shape = tuple(int(s) for s in text.lower().split("x"))
        for source in args.sources:
            first, per_batch = time_source(shape, source, args, device)
            per_pair = per_batch / args.batch
            print(f"{text:>12} {source:>8} {first:8.2f} {per_pair:8.3f} {1 / per_pair:8.1f}", flush=True)
        if not args.no_network:
            step = time_training_step(shape, device, max(1, min(args.repeats, 3)))
            print(
                f"{text:>12} {'VM-2 train step':>17} "
                + ("(network not importable)" if step is None else f"{step:8.3f} s"),
                flush=True,
            )


if __name__ == "__main__":
    main()
