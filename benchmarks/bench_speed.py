"""Speed of voxreg against ANTs SyN and voxelmorph 0.3.4, same machine, same thread count.

- network: voxreg VoxelMorph forward + warp (VM-2 with half-resolution field, and VM-2 with a
  full-resolution field; random weights, inference mode) at a few sizes, against voxelmorph
  0.3.4's ``VxmPairwise`` forward with ``return_warped_source=True`` (its defaults: BasicUNet
  with 16 features per level from neurite, 5 integration steps). voxelmorph is installed by
  this script into a throw-away venv (``--vxm-venv``, default /tmp/vxm-venv: ``python -m venv``,
  ``pip install voxelmorph==0.3.4 torch==<voxreg's torch>``; its backend is PyTorch + neurite,
  no TensorFlow). An install failure (e.g. offline) or a crash at a size is recorded with a
  one-line reason; the largest size it accepts is in the table.
- registration of one 1 mm brain pair: Mindboggle OASIS-TRT-20 subject 2 -> 1 (native space,
  256x256x160) with ``voxreg.register(..., metrics=False)`` (affine + instance optimisation)
  against ``ants.registration(type_of_transform='SyN')`` (antspy's defaults: affine then SyN)
  when antspyx is importable, with ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS = torch threads.
  Without the data (or with ``--quick``) a synthetic smooth pair is used (labelled).

    python benchmarks/bench_speed.py [--quick] [--threads N] [--repeats 2] [--no-ants] [--no-vxm]

Ratios are other / voxreg (> 1: voxreg is faster). Timings on a shared machine move with its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# each axis a multiple of 32: voxelmorph 0.3.4's BasicUNet (5 levels) does not pad and fails
# otherwise (e.g. 64x80x64: 'Sizes of tensors must match'); voxreg pads internally
FULL_SIZES = [(64, 96, 64), (96, 128, 96), (160, 192, 224)]
QUICK_SIZES = [(64, 96, 64), (96, 128, 96)]

VXM_SCRIPT = r"""
import json, sys, time, torch
import voxelmorph as vxm
shape, repeats, threads = tuple(json.loads(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
model = vxm.nn.models.VxmPairwise(ndim=3, source_channels=1, target_channels=1).eval()
g = torch.Generator().manual_seed(0)
src, trg = torch.rand(1, 1, *shape, generator=g), torch.rand(1, 1, *shape, generator=g)
times = []
for i in range(repeats + 1):
    t0 = time.perf_counter()
    with torch.inference_mode():
        field, warped = model(src, trg, return_warped_source=True)
    if i:
        times.append(time.perf_counter() - t0)
assert warped.shape == src.shape
import resource
print("VXM_RESULT " + json.dumps({"ms": 1000 * min(times), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__, "vxm": vxm.__version__}))
"""


def _fmt_shape(shape) -> str:
    return "x".join(map(str, shape))


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "no output"


# --------------------------------------------------------------------------- voxreg network


def time_voxreg_network(shape, half_res: bool, repeats: int) -> float:
    """Best wall ms of forward + warp after one warm-up."""
    import torch

    from voxreg.core import spatial
    from voxreg.nn import NetworkConfig, VoxelMorph

    model = VoxelMorph(NetworkConfig.vm2(3, half_res=half_res)).eval()
    gen = torch.Generator().manual_seed(0)
    moving, fixed = torch.rand(1, 1, *shape, generator=gen), torch.rand(1, 1, *shape, generator=gen)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.inference_mode():
            warped = spatial.warp(moving, model.predict_field(moving, fixed))
        if i:
            times.append(time.perf_counter() - t0)
    assert warped.shape == moving.shape
    return 1000 * min(times)


# --------------------------------------------------------------------------- voxelmorph 0.3.4


def ensure_vxm(venv: Path) -> tuple[Path | None, str]:
    """Python of a venv with voxelmorph 0.3.4 (created when missing), or (None, reason)."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import voxelmorph, torch; print(voxelmorph.__version__, torch.__version__)"]
    if python.exists():
        probe = subprocess.run(check, capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.split()[0] == "0.3.4":
            return python, f"voxelmorph {probe.stdout.strip().replace(' ', ', torch ')} (reused {venv})"
    import torch

    torch_pin = "torch==" + torch.__version__.split("+")[0]
    print(f"[bench_speed] installing voxelmorph==0.3.4 {torch_pin} into {venv} ...", flush=True)
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True)
        pip = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "voxelmorph==0.3.4", torch_pin],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return None, f"install failed: {_one_line(getattr(exc, 'stderr', '') or str(exc))}"
    if pip.returncode != 0:
        return None, f"pip install voxelmorph==0.3.4 failed: {_one_line(pip.stderr)}"
    probe = subprocess.run(check, capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"voxelmorph installed but does not import: {_one_line(probe.stderr)}"
    return python, f"voxelmorph {probe.stdout.strip().replace(' ', ', torch ')} (installed into {venv})"


def time_vxm(python: Path, shape, repeats: int, threads: int, timeout: float = 900) -> dict:
    """{'ms': ...} or {'error': one line} for one size, in a fresh process."""
    cmd = [str(python), "-c", VXM_SCRIPT, json.dumps(list(shape)), str(repeats), str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("VXM_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    if proc.returncode < 0:
        return {"error": f"killed by signal {-proc.returncode} (out of memory?)"}
    return {"error": f"exit {proc.returncode}: {_one_line(proc.stderr)}"}


# --------------------------------------------------------------------------- one brain pair


def brain_pair(data: Path, quick: bool):
    """(fixed, moving, description): Mindboggle 2 -> 1 paths, or synthetic voxreg Images."""
    folder = data / "brain_mri" / "mindboggle_oasis_trt20"
    fixed = folder / "OASIS-TRT-20-1" / "t1weighted_brain.nii.gz"
    moving = folder / "OASIS-TRT-20-2" / "t1weighted_brain.nii.gz"
    if fixed.exists() and moving.exists() and not quick:
        return fixed, moving, "Mindboggle OASIS-TRT-20 2 -> 1 (256x256x160, 1 mm, native space)"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check import smooth_random_pair
    from voxreg.core.image import Image

    shape = (80, 96, 112)
    f, m = smooth_random_pair(shape, "cpu")
    why = "--quick" if quick else "no Mindboggle data"
    return Image(f[0, 0].numpy()), Image(m[0, 0].numpy()), f"synthetic smooth pair {_fmt_shape(shape)} ({why})"


def time_voxreg_register(fixed, moving) -> dict:
    from voxreg.registration import pipeline as api

    t0 = time.perf_counter()
    result = api.register(fixed, moving, metrics=False, device="cpu")
    wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "affine": result.metrics.get("affine", {}).get("seconds", 0.0),
        "deformable": result.metrics["registration_seconds"],
    }


def time_ants_syn(fixed, moving) -> dict:
    try:
        import ants
    except ImportError as exc:
        return {"error": f"antspyx not importable: {exc}"}
    if isinstance(fixed, Path):
        f, m = ants.image_read(str(fixed)), ants.image_read(str(moving))
    else:
        f, m = ants.from_numpy(fixed.array.astype("float32")), ants.from_numpy(moving.array.astype("float32"))
    t0 = time.perf_counter()
    ants.registration(fixed=f, moving=m, type_of_transform="SyN")
    return {"wall": time.perf_counter() - t0, "version": getattr(ants, "__version__", "?")}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes only (network <= 96x128x96, synthetic pair)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and ITK threads")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up (network)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--vxm-venv", type=Path, default=Path("/tmp/vxm-venv"))
    p.add_argument("--no-vxm", action="store_true")
    p.add_argument("--no-ants", action="store_true")
    args = p.parse_args(argv)
    # before ants/ITK is imported: same thread count for every method
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    rows: list[tuple[str, str, str, str, str]] = []
    notes: list[str] = []

    print(f"[bench_speed] torch {torch.__version__}, {args.threads} threads, sizes {sizes}", flush=True)
    voxreg_ms = {}
    for shape in sizes:
        voxreg_ms[shape] = (
            time_voxreg_network(shape, True, args.repeats),
            time_voxreg_network(shape, False, args.repeats),
        )
        print(
            f"[bench_speed] voxreg {_fmt_shape(shape)}: VM-2 half {voxreg_ms[shape][0]:.0f} ms, VM-2 {voxreg_ms[shape][1]:.0f} ms",
            flush=True,
        )

    vxm: dict = {}
    if not args.no_vxm:
        python, status = ensure_vxm(args.vxm_venv)
        notes.append(status)
        if python is not None:
            for shape in sizes:
                vxm[shape] = time_vxm(python, shape, args.repeats, args.threads)
                print(f"[bench_speed] voxelmorph {_fmt_shape(shape)}: {vxm[shape]}", flush=True)
            if any("params" in r for r in vxm.values()):
                params = next(r["params"] for r in vxm.values() if "params" in r)
                notes.append(f"VxmPairwise default: {params} parameters")
    for shape in sizes:
        half, full = voxreg_ms[shape]
        r = vxm.get(shape)
        if r is None:
            other, ratio = ("not run" if args.no_vxm else "not installed"), ""
        elif "error" in r:
            other, ratio = f"FAILED: {r['error']}", ""
        else:
            other, ratio = f"{r['ms']:.0f} ms", f"{r['ms'] / half:.1f}x / {r['ms'] / full:.1f}x"
        rows.append(
            (
                f"network forward + warp {_fmt_shape(shape)}",
                f"{half:.0f} ms / {full:.0f} ms",
                "voxelmorph 0.3.4 VxmPairwise",
                other,
                ratio,
            )
        )
    accepted = [s for s, r in vxm.items() if "ms" in r]
    if vxm:
        notes.append(
            f"largest size voxelmorph accepted: {_fmt_shape(max(accepted, key=lambda s: s[0] * s[1] * s[2])) if accepted else 'none'}"
        )

    fixed, moving, description = brain_pair(args.data, args.quick)
    print(f"[bench_speed] registration: {description}", flush=True)
    vox = time_voxreg_register(fixed, moving)
    print(f"[bench_speed] voxreg register: {vox}", flush=True)
    ants_result = {"error": "not run (--no-ants)"} if args.no_ants else time_ants_syn(fixed, moving)
    print(f"[bench_speed] ANTs SyN: {ants_result}", flush=True)
    voxreg_cell = f"{vox['wall']:.1f} s (affine {vox['affine']:.1f} + deformable {vox['deformable']:.1f})"
    if "error" in ants_result:
        rows.append(("registration, " + description, voxreg_cell, "ANTs SyN", ants_result["error"], ""))
    else:
        ratio = f"{ants_result['wall'] / vox['wall']:.1f}x"
        rows.append(
            (
                "registration, " + description,
                voxreg_cell,
                f"ANTs SyN (antspyx {ants_result['version']})",
                f"{ants_result['wall']:.1f} s",
                ratio,
            )
        )

    print()
    print(f"torch {torch.__version__}, {args.threads} threads (torch and ITK), load average {os.getloadavg()[0]:.2f}")
    print("| task | voxreg (network: VM-2 half-res / VM-2) | other | other time | ratio other/voxreg |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
