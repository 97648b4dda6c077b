"""One prepared GPU check: CUDA tests, network / instance-optimisation / training timings.

Run through ``bash benchmarks/gpu_check.sh`` (which sets up .venv first) on a machine with
one NVIDIA GPU; it also runs end to end on CPU (smaller sizes, labelled as such). Each part
runs in its own subprocess with a timeout taken from one overall budget (``--budget``, 170 s
by default on CUDA so that the whole check ends within 3 minutes), so a part that fails or
hangs is reported as FAILED with a one-line reason and the rest goes on. Prints ONE markdown
table; with ``$OUT`` set (or ``--out DIR``) it is also written to ``DIR/gpu_check.md``.

    python benchmarks/gpu_check.py [--device auto|cpu|cuda] [--budget S] [--out DIR]

Parts (CUDA / CPU fallback):
- tests: the CUDA-only tests (they skip without CUDA), selected by name in the files that hold them
- network: VM-2, half-resolution field, not lambda-conditional, random weights and input,
  forward + warp at 160x192x224 (3 warm-ups + 10 repeats; CPU: 1 + 2)
- instance: ``voxreg.registration.instance.align`` (default AlignConfig) on a smooth random
  image and its copy deformed by ``voxreg.core.synthetic.smooth_random_field``
  (160x192x224; CPU: 80x96x112)
- register: ``voxreg.register`` with the shipped model end to end (affine on the CPU, network,
  warp) on a 1 mm MNI152 pair, and the default engine once
- train-scans: ``voxreg train`` on 4 synthetic scans, ``--amp``, VM-2 half-res field
  (160x192x224, 20 steps; CPU: 64x80x64, 5 steps, amp is a no-op on CPU)
- train-synth: ``voxreg train --synth shapes --synth-shape 64x80x64 --dice-weight 1
  --similarity-weight 0 --amp`` (20 steps; CPU: 5 steps)
s/step of a training = (seconds at the last step - seconds at the first step) / (steps - 1),
from its metrics.csv (the first step, with CUDA/cuDNN warm-up, is left out).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL_SHAPE = (160, 192, 224)
TEST_FILES = [
    "tests/test_train_engineering.py",
    "tests/training/test_synth.py",
    "tests/test_cli.py",
    "tests/core/test_optim.py",
]
TEST_SELECT = "cuda or amp or gpu or mixed_precision"


# --------------------------------------------------------------------------- helpers (children)


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device) -> float:
    """Peak CUDA memory allocated by torch (MB), or the process's peak RSS on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def smooth_random_pair(shape: tuple[int, ...], device, seed: int = 0, max_displacement: float = 4.0):
    """A smooth random image in [0, 1] inside an ellipsoid (background 0), and its copy warped
    by a smooth diffeomorphic random field from voxreg.core.synthetic."""
    import torch
    import torch.nn.functional as F

    from voxreg.core import spatial, synthetic

    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *[max(4, s // 8) for s in shape], generator=gen)
    image = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    image = (image - image.min()) / (image.max() - image.min())
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = (sum(a * a for a in axes) < 0.8).float()[None, None]
    fixed = (0.2 + 0.8 * image) * inside
    field = synthetic.smooth_random_field(shape, max_displacement, seed=seed, device="cpu")
    moving = spatial.warp(fixed, field)
    return fixed.to(device), moving.to(device)


def part_network(args: argparse.Namespace) -> dict:
    import torch

    from voxreg.core import spatial
    from voxreg.nn import NetworkConfig, VoxelMorph

    device = _device(args.device)
    shape = FULL_SHAPE
    warmups, repeats = (3, 10) if device.type == "cuda" else (1, 2)
    model = VoxelMorph(NetworkConfig.vm2(3, half_res=True)).to(device).eval()
    assert not model.config.lambda_conditional
    gen = torch.Generator().manual_seed(0)
    moving, fixed = (torch.rand(1, 1, *shape, generator=gen).to(device) for _ in range(2))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmups + repeats):
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            field = model.predict_field(moving, fixed)
            warped = spatial.warp(moving, field)
        _sync(device)
        if i >= warmups:
            times.append(time.perf_counter() - t0)
    assert warped.shape == moving.shape
    times.sort()
    return {
        "value": f"{1000 * times[len(times) // 2]:.1f} ms/pair (median; min {1000 * times[0]:.1f})",
        "peak_mb": _peak_mb(device),
        "note": f"{'x'.join(map(str, shape))}, {warmups} warm-ups + {repeats} repeats, {device.type}",
    }


def part_instance(args: argparse.Namespace) -> dict:
    import torch

    from voxreg.registration.instance import AlignConfig, align

    device = _device(args.device)
    shape = FULL_SHAPE if device.type == "cuda" else tuple(s // 2 for s in FULL_SHAPE)
    fixed, moving = smooth_random_pair(shape, device)
    small_f, small_m = smooth_random_pair((32, 32, 32), device, seed=1)  # warm-up: kernels, allocator
    align(small_f, small_m, AlignConfig(iterations=(3, 2, 1)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    result = align(fixed, moving, AlignConfig())
    _sync(device)
    seconds = time.perf_counter() - t0
    before = float((fixed - moving).abs().mean())
    from voxreg.core import spatial

    after = float((fixed - spatial.warp(moving, result.field)).abs().mean())
    label = "x".join(map(str, shape)) + ("" if shape == FULL_SHAPE else " (CPU: half size)")
    return {
        "value": f"{seconds:.2f} s/pair ({AlignConfig().total_iterations} steps)",
        "peak_mb": _peak_mb(device),
        "note": f"{label}; mean abs(F - M) {before:.4f} -> {after:.4f}",
    }


def part_register(args: argparse.Namespace) -> dict:
    """End to end: ``voxreg.register`` with the shipped brain model (affine on the CPU, then the
    network, then the warp; files excluded) on a 1 mm MNI152 pair (197x233x189), the moving
    copy deformed by a smooth field and shifted 4 mm in its header; then the default engine
    (model + its refinement) once."""
    import numpy as np
    import torch

    import voxreg
    from voxreg.core import spatial, synthetic
    from voxreg.core.image import Image
    from voxreg.io.templates import mni152_template

    device = _device(args.device)
    fixed = mni152_template(1)
    tensor = torch.from_numpy(np.ascontiguousarray(fixed.array, dtype=np.float32))[None, None]
    field = synthetic.smooth_random_field(fixed.shape, 4.0, seed=2, device="cpu")
    affine = fixed.affine.copy()
    affine[:3, 3] += [4.0, -3.0, 2.0]
    moving = Image(spatial.warp(tensor, field)[0, 0].numpy(), affine)
    options = {"model": "brain", "metrics": False, "device": device.type}
    voxreg.register(fixed, moving, refine=0, **options)  # warm-up: model load, kernels
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [voxreg.register(fixed, moving, refine=0, **options).metrics for _ in range(3)]
    runs.sort(key=lambda m: m["pipeline_seconds"])
    median = runs[1]
    default = voxreg.register(fixed, moving, **options).metrics
    return {
        "value": f"{median['pipeline_seconds']:.2f} s/pair (median of 3)",
        "peak_mb": _peak_mb(device),
        "note": f"1 mm MNI152 197x233x189; affine {median['affine']['seconds']:.2f} s (CPU), network + field "
        f"{median['registration_seconds']:.3f} s; default engine ({default['engine']}) "
        f"{default['pipeline_seconds']:.2f} s",
    }


def _write_scans(folder: Path, shape: tuple[int, ...], count: int = 4) -> list[str]:
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        fixed, _ = smooth_random_pair(shape, "cpu", seed=10 + i)
        path = folder / f"scan{i}.nii"  # uncompressed: writing is fast
        nib.save(nib.Nifti1Image(fixed[0, 0].numpy().astype(np.float32), np.eye(4)), str(path))
        paths.append(str(path))
    return paths


def _run_train_cli(argv: list[str], device) -> None:
    """``voxreg train ...`` in this process (so that the peak CUDA memory is this run's)."""
    from voxreg.cli.app import app

    try:
        app(["train", *argv], standalone_mode=False)
    except SystemExit as exc:  # typer/click exit codes
        if exc.code not in (0, None):
            raise RuntimeError(f"voxreg train exited with {exc.code}") from None


def _seconds_per_step(run: Path) -> tuple[float, int]:
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    rows = [r for r in rows if r.get("seconds") not in ("", None)]
    if len(rows) < 2:
        raise RuntimeError(f"metrics.csv has {len(rows)} rows")
    first, last = rows[0], rows[-1]
    steps = int(float(last["step"])) - int(float(first["step"]))
    return (float(last["seconds"]) - float(first["seconds"])) / max(steps, 1), int(float(last["step"]))


def part_train(args: argparse.Namespace, synth: bool) -> dict:
    import torch

    device = _device(args.device)
    cuda = device.type == "cuda"
    steps = 20 if cuda else 5
    tmp = Path(tempfile.mkdtemp(prefix="voxreg_gpu_check_"))
    common = ["--amp", "--steps", str(steps), "--device", device.type, "--checkpoint-every", "1000"]
    if synth:
        argv = ["--synth", "shapes", "--synth-shape", "64x80x64", "--dice-weight", "1", "--similarity-weight", "0"]
        label = "synth shapes 64x80x64, Dice only"
    else:
        shape = FULL_SHAPE if cuda else (64, 80, 64)
        argv = [*_write_scans(tmp / "scans", shape), "--network", "vm2", "--half-res"]
        label = f"4 scans {'x'.join(map(str, shape))}{'' if cuda else ' (CPU: small)'}, VM-2 half-res, NCC"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _run_train_cli([*argv, *common, "-o", str(tmp / "run")], device)
    wall = time.perf_counter() - t0
    per_step, last = _seconds_per_step(tmp / "run")
    amp = "amp" if cuda else "amp is CUDA-only: fp32"
    return {
        "value": f"{per_step:.3f} s/step",
        "peak_mb": _peak_mb(device),
        "note": f"{label}; {last} steps, {amp}; whole command {wall:.1f} s",
    }


def child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    parts = {
        "network": part_network,
        "instance": part_instance,
        "register": part_register,
        "train-scans": lambda a: part_train(a, synth=False),
        "train-synth": lambda a: part_train(a, synth=True),
    }
    row = parts[args.part](args)
    print("GPU_CHECK_RESULT " + json.dumps(row), flush=True)


# --------------------------------------------------------------------------- parent


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no output"


def _run_part(name: str, args: argparse.Namespace, timeout: float) -> dict:
    if timeout < 5:
        return {"status": "FAILED", "reason": "no time left in the overall budget"}
    cmd = [sys.executable, __file__, "--part", name, "--device", args.device, "--threads", str(args.threads)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "FAILED", "reason": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("GPU_CHECK_RESULT "):
            return {"status": "ok", "wall": wall, **json.loads(line.split(" ", 1)[1])}
    return {"status": "FAILED", "reason": f"exit {proc.returncode}: {_last_line(proc.stderr or proc.stdout)}"}


def _run_tests(args: argparse.Namespace, timeout: float) -> dict:
    if timeout < 5:
        return {"status": "FAILED", "reason": "no time left in the overall budget"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "not slow",
        "-k",
        TEST_SELECT,
        "-p",
        "no:cacheprovider",
        *TEST_FILES,
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "FAILED", "reason": f"timed out after {timeout:.0f} s"}
    summary = _last_line(proc.stdout)
    status = "ok" if proc.returncode in (0, 5) else "FAILED"  # 5: nothing selected
    if status == "FAILED":
        failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
        summary = "; ".join(failed[:3]) or summary
    return {"status": status, "value": summary, "reason": summary, "wall": time.perf_counter() - t0}


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": platform.python_version()}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
        info["bf16"] = torch.cuda.is_bf16_supported()
    else:
        info["device"] = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no CUDA"
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--budget", type=float, default=None, help="seconds for all parts (170 on CUDA, 480 on CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the children (0: torch default)")
    p.add_argument("--out", type=Path, default=None, help="folder for gpu_check.md (default: $OUT when set)")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        child(args)
        return 0
    start = time.perf_counter()
    env = environment()
    if args.device == "auto":
        args.device = "cuda" if env["cuda"] else "cpu"
    if args.device == "cuda" and not env["cuda"]:
        print(f"torch has no CUDA on this machine: {env['torch']} -- running the CPU parts instead", flush=True)
        args.device = "cpu"
    cuda = args.device == "cuda"
    budget = args.budget or (170.0 if cuda else 480.0)
    # per-part caps (s); the overall budget bounds them further
    caps = {"tests": 50, "network": 25, "instance": 35, "register": 30, "train-scans": 40, "train-synth": 30}
    if not cuda:
        caps = {"tests": 90, "network": 90, "instance": 150, "register": 120, "train-scans": 120, "train-synth": 90}
    results: dict[str, dict] = {}
    for name in caps:
        left = budget - (time.perf_counter() - start)
        timeout = min(caps[name], left)
        print(f"[gpu_check] {name} (timeout {timeout:.0f} s) ...", flush=True)
        results[name] = _run_tests(args, timeout) if name == "tests" else _run_part(name, args, timeout)
        r = results[name]
        print(f"[gpu_check]   {r['status']}: {r.get('value') if r['status'] == 'ok' else r['reason']}", flush=True)
    table = render(env, results, cuda, time.perf_counter() - start)
    print()
    print(table)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.md").write_text(table + "\n")
        print(f"\nwritten: {out / 'gpu_check.md'}")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


def render(env: dict, results: dict[str, dict], cuda: bool, total: float) -> str:
    mem = "peak GPU memory" if cuda else "peak RSS (no CUDA)"
    rows = [
        ("device", env["device"], "", f"python {env['python']}"),
        ("torch", env["torch"], "", f"CUDA available: {env['cuda']}" + (f", bf16: {env['bf16']}" if cuda else "")),
    ]
    labels = {
        "tests": "CUDA tests (`-k " + TEST_SELECT.replace(" or ", "|") + "`)",
        "network": "network forward + warp, VM-2 half-res",
        "instance": "instance optimisation (align, defaults)",
        "register": "`voxreg.register`, shipped model, 1 mm pair",
        "train-scans": "training `voxreg train --amp`, scans",
        "train-synth": "training `voxreg train --amp --synth shapes`",
    }
    for name, label in labels.items():
        r = results[name]
        if r["status"] != "ok":
            rows.append((label, "FAILED", "", r["reason"]))
            continue
        peak = r.get("peak_mb")
        note = r.get("note", "") if name != "tests" else ("no CUDA: CUDA tests skip" if not cuda else "")
        rows.append((label, r["value"], f"{peak:.0f} MB" if peak else "", f"{note} ({r['wall']:.0f} s)".strip()))
    rows.append(("whole check", f"{total:.0f} s", "", "" if cuda else "CPU fallback: smaller sizes where labelled"))
    lines = [f"| item | result | {mem} | notes |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
