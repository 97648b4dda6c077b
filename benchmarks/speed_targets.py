"""The speed targets of issue 16, measured in one run and printed as one table.

Runs each measurement in its own Python process against a voxreg source tree (``--src``,
default this checkout's ``src``), so the same script measures an older revision too
(``git worktree add /tmp/before <rev>`` then ``--src /tmp/before/src``):

1. instance optimisation, Mindboggle OASIS-TRT-20 pairs 2->1 ... 16->15 (native 1 mm, 98
   manual labels): affine + deformable + warp seconds (files excluded) and mean Dice;
2. the shipped network alone on the same pairs (affine + network + warp; loading and saving
   the outputs timed separately; peak RSS of that process), and the default engine;
3. a small 32x128x128 pair (synthetic, 3.6 x 0.6 x 0.6 mm): voxreg in-process (first call
   and warm), ``voxreg register`` on files (process start-up included), ANTs SyN;
4. instance optimisation and ANTs SyN on pair 2->1 alone and beside a busy process;
5. ``voxreg register-batch`` over 4 pairs (pairs per minute);
6. GPU: only with CUDA (``benchmarks/gpu_check.sh`` is the full check);
7. peers: ``benchmarks/bench_speed.py`` (voxelmorph 0.3.4, ANTs) is a separate run.

    python benchmarks/speed_targets.py [--src DIR] [--pairs 8] [--no-ants] [--out FILE.json]

Timings on a shared machine move with its load: pause other work first.
"""

from __future__ import annotations

import argparse
import csv as csv_module
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synth_learning import DATA  # the Mindboggle folder the held-out pairs come from

HERE = Path(__file__).resolve().parent

PAIRS = [(2, 1), (4, 3), (6, 5), (8, 7), (10, 9), (12, 11), (14, 13), (16, 15)]

# --------------------------------------------------------------------------- child code
CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
import numpy as np
args = json.loads(sys.argv[1])
import torch
import voxreg
from voxreg import io
sys.path.insert(0, args["benchmarks"])
from synth_learning import _mean_dice as mean_dice, _subject as subject  # the held-out pairs and their Dice
torch.set_num_threads(args["threads"])

def brain_pairs(kind, pairs, **options):
    rows = []
    for moving_id, fixed_id in pairs:
        (fixed, fixed_labels), (moving, moving_labels) = subject(fixed_id), subject(moving_id)
        start = time.perf_counter()
        images = [io.load_image(fixed), io.load_image(moving), io.load_image(moving_labels, label=True)]
        load = time.perf_counter() - start
        result = voxreg.register(images[0], images[1], moving_labels={"labels": images[2]}, metrics=False, device="cpu", **options)
        truth = io.load_image(fixed_labels, label=True).array
        peak_register = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # before saving
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            result.save(out, figure=False)
        save = time.perf_counter() - start
        rows.append({"pair": f"{moving_id}->{fixed_id}", "seconds": result.metrics["pipeline_seconds"],
                     "affine": result.metrics["affine"]["seconds"], "deformable": result.metrics["registration_seconds"],
                     "load": load, "save": save, "peak_register_gb": peak_register, "dice": mean_dice(truth, result.warped_labels["labels"].array),
                     "engine": result.metrics.get("engine")})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del result, images, truth  # the next pair's peak is its own, not this pair's plus it
    return rows

def small_pair(folder):
    from scipy import ndimage
    from voxreg.core.image import Image
    from voxreg.core.synthetic import make_synthetic_pair
    rng = np.random.default_rng(0)
    shape = (32, 128, 128)
    texture = ndimage.gaussian_filter(rng.random(shape), (1, 4, 4))
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    _, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    image = (texture * ((yy**2 + xx**2) < 0.7)).astype(np.float32)
    pair = make_synthetic_pair(Image(image, np.diag([3.6, 0.6, 0.6, 1.0])), max_displacement=3.0, seed=1)
    paths = [Path(folder) / "fixed.nii.gz", Path(folder) / "moving.nii.gz"]
    io.save_image(pair.fixed, paths[0]); io.save_image(pair.moving, paths[1])
    return pair, paths

kind = args["kind"]
if kind in ("instance", "network", "default"):
    options = {"instance": {"engine": "instance"}, "network": {"model": "brain", "refine": 0}, "default": {}}[kind]
    out = {"rows": brain_pairs(kind, [tuple(p) for p in args["pairs"]], **options)}
elif kind == "small":
    pair, _ = small_pair(args["folder"])
    times = []
    for _ in range(2):
        start = time.perf_counter()
        voxreg.register(pair.fixed, pair.moving, metrics=False, device="cpu")
        times.append(time.perf_counter() - start)
    out = {"first": times[0], "warm": times[1]}
elif kind == "small-files":
    small_pair(args["folder"])
    out = {}
elif kind == "ants":
    import ants
    if args.get("small"):
        fixed, moving = (ants.image_read(str(Path(args["folder"]) / n)) for n in ("fixed.nii.gz", "moving.nii.gz"))
    else:
        (fixed, _), (moving, _) = subject(args["pair"][1]), subject(args["pair"][0])
        fixed, moving = ants.image_read(str(fixed)), ants.image_read(str(moving))
    start = time.perf_counter()
    ants.registration(fixed, moving, type_of_transform="SyN")
    out = {"seconds": time.perf_counter() - start}
out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print("RESULT " + json.dumps(out))
"""


def child(src: Path, threads: int, **kind) -> dict:
    """Run one measurement in a fresh process with ``src`` first on the path."""
    env = dict(os.environ, PYTHONPATH=str(src), ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads))
    payload = json.dumps({"threads": threads, "benchmarks": str(HERE), **kind})
    done = subprocess.run([sys.executable, "-c", CHILD, payload], env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind.get('kind')} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")


def busy_process() -> subprocess.Popen:
    """A process spinning one core (the 'busy machine' of target 4)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def cli_seconds(src: Path, folder: Path, threads: int) -> float:
    """Wall seconds of ``voxreg register`` on the small pair's files (start-up included)."""
    env = dict(os.environ, PYTHONPATH=str(src))
    env.pop("VIRTUAL_ENV", None)
    command = [sys.executable, "-m", "voxreg.cli", "register", str(folder / "fixed.nii.gz"), str(folder / "moving.nii.gz"),
               "-o", str(folder / "out"), "--device", "cpu"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def batch_rate(src: Path, pairs: list[tuple[int, int]], folder: Path) -> tuple[float, int]:
    """Pairs per minute of ``voxreg register-batch`` (default engine) and how many succeeded."""
    csv = folder / "pairs.csv"
    lines = ["fixed,moving,id"]
    for moving_id, fixed_id in pairs:
        lines.append(f"{DATA}/OASIS-TRT-20-{fixed_id}/t1weighted_brain.nii.gz,"
                     f"{DATA}/OASIS-TRT-20-{moving_id}/t1weighted_brain.nii.gz,p{moving_id}_{fixed_id}")  # fmt: skip
    csv.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=str(src))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "voxreg.cli", "register-batch", str(csv), "-o", str(folder / "batch"),
                    "--device", "cpu"], env=env, capture_output=True)  # fmt: skip
    seconds = time.perf_counter() - start
    with open(folder / "batch" / "batch.csv", newline="") as handle:
        ok = sum(row["status"] == "ok" for row in csv_module.DictReader(handle))
    return 60.0 * len(pairs) / seconds, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=HERE.parent / "src")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-ants", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} not found (real validation data is not shipped with voxreg)")
        return 0
    src, threads, pairs = args.src.resolve(), args.threads, PAIRS[: args.pairs]
    results: dict = {"src": str(src), "threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for kind in ("instance", "network", "default"):
            measured = child(src, threads, kind=kind, pairs=pairs)
            results[kind], results[f"{kind}_peak_rss_gb"] = measured["rows"], measured["peak_rss_gb"]
            print(
                f"[speed] {kind}: {mean(results[kind], 'seconds'):.2f} s, Dice {mean(results[kind], 'dice'):.4f}",
                flush=True,
            )
        results["small"] = child(src, threads, kind="small", folder=str(folder))
        child(src, threads, kind="small-files", folder=str(folder))
        results["small_cli"] = cli_seconds(src, folder, threads)
        if not args.no_ants:
            results["small_ants"] = child(src, threads, kind="ants", small=True, folder=str(folder))["seconds"]
        results["alone"] = child(src, threads, kind="instance", pairs=[PAIRS[0]])["rows"][0]["seconds"]
        busy = busy_process()
        try:
            results["loaded"] = child(src, threads, kind="instance", pairs=[PAIRS[0]])["rows"][0]["seconds"]
            if not args.no_ants:
                results["ants_loaded"] = child(src, threads, kind="ants", pair=PAIRS[0])["seconds"]
        finally:
            busy.kill()
        if not args.no_ants:
            results["ants_alone"] = child(src, threads, kind="ants", pair=PAIRS[0])["seconds"]
        results["batch_per_minute"], results["batch_ok"] = batch_rate(src, PAIRS[:4], folder)
    import torch

    results["gpu"] = "not measured: no CUDA device" if not torch.cuda.is_available() else "run benchmarks/gpu_check.sh"
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print_table(results)
    return 0


def print_table(r: dict) -> None:
    """One markdown table of the seven targets."""
    inst, net, default = r["instance"], r["network"], r["default"]
    warm = net[1:] or net  # the first call of a process also imports torch._dynamo (torch.optim): ~1 s once
    ants = lambda key: f"{r[key]:.1f} s" if key in r else "not run"  # noqa: E731
    rows = [
        ("1 instance optimisation, 1 mm brain (affine + deformable + warp)", "<= 10 s, Dice 0.651 +- 0.005",
         f"{mean(inst, 'seconds'):.1f} s (affine {mean(inst, 'affine'):.1f}), Dice {mean(inst, 'dice'):.4f}"),
        ("2 network alone, 1 mm brain (affine + network + warp)", "<= 1 s, <= 2 GB",
         f"{mean(warm, 'seconds'):.2f} s per pair after the first (affine {mean(warm, 'affine'):.2f}); "
         f"first call in the process {net[0]['seconds']:.2f} s; mean of all {mean(net, 'seconds'):.2f} s; "
         f"Dice {mean(net, 'dice'):.4f}, "
         f"peak memory {net[0]['peak_register_gb']:.2f} GB through the first registration (process start, "
         f"loading, a label map), {max(row['peak_register_gb'] for row in net):.2f} GB over the 8 before saving, "
         f"{r['network_peak_rss_gb']:.2f} GB with saving; loading {mean(net, 'load'):.2f} s, saving {mean(net, 'save'):.2f} s"),
        ("2b default engine (network + refinement)", "",
         f"{mean(default, 'seconds'):.1f} s, Dice {mean(default, 'dice'):.4f} ({default[0]['engine']})"),
        ("3 small 32x128x128 pair", "cost scales with the image",
         f"in-process first {r['small']['first']:.1f} s / warm {r['small']['warm']:.1f} s; "
         f"`voxreg register` wall {r['small_cli']:.1f} s; ANTs SyN {ants('small_ants')}"),
        ("4 instance optimisation alone / beside a busy process (pair 2->1)", "no collapse",
         f"{r['alone']:.1f} s / {r['loaded']:.1f} s (x{r['loaded'] / r['alone']:.2f}); "
         f"ANTs SyN {ants('ants_alone')} / {ants('ants_loaded')}"),
        ("5 register-batch, 4 pairs, default engine", "pairs per minute",
         f"{r['batch_per_minute']:.1f} pairs/min ({r['batch_ok']} ok)"),
        ("6 GPU", "network <= 20 ms, instance <= 1 s", r["gpu"]),
        ("7 peers", "ratios", "benchmarks/bench_speed.py (separate run)"),
    ]  # fmt: skip
    print(f"\nsrc {r['src']}, {r['threads']} threads, {len(inst)} Mindboggle pairs\n")
    print("| target | goal | measured |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    sys.exit(main())
