"""Large scans: seconds and peak memory of `voxreg register` on one pair at three sizes, up to
a 0.7 mm 512x512x300 volume (78.6 M voxels).

The pair is made from a real scan (default: the TotalSegmentator example CT, 3 mm, HU):
the fixed image is the scan resampled finer onto a grid of the same field of view at every
size (358.4 x 358.4 x 210 mm: 1.4 mm 256x256x150, 1.0 mm 358x358x210, 0.7 mm 512x512x300),
the moving image is the same scan resampled through a known smooth synthetic deformation
(`voxreg.core.synthetic.smooth_random_field`, the same in millimetres at every size: at most
``--max-mm``, correlation length ``--smooth-mm``). Inputs are made in a child process, then
each size is registered by a fresh `voxreg register ... --no-figure` process: wall seconds,
peak resident memory, metrics.json's stage seconds and NCC. ``--quick``: one 4.2 mm grid.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import pairs, timing

SUMMARY = "one pair at three sizes up to 0.7 mm 512x512x300 (real scan + known deformation): seconds, peak memory"
FOV_MM = (358.4, 358.4, 210.0)
SIZES_MM = (1.4, 1.0, 0.7)
QUICK_SIZES_MM = (4.2,)


def grid_shape(spacing: float, fov_mm: tuple[float, ...] = FOV_MM) -> tuple[int, ...]:
    """Voxels per axis covering ``fov_mm`` at ``spacing`` mm (0.7 mm -> 512x512x300)."""
    return tuple(int(round(f / spacing)) for f in fov_mm)


def make_pair(
    scan: str, folder: str, spacing: float, shape: list[int], max_mm: float, smooth_mm: float, seed: int = 0
) -> dict[str, Any]:
    """Write fixed.nii.gz (``scan`` resampled onto an isotropic ``spacing`` grid of ``shape``,
    centred on the scan, its axes) and moving.nii.gz (the scan through a known smooth field)
    into ``folder``; returns their paths and the field's largest displacement in mm."""
    import numpy as np

    from voxreg import io
    from voxreg.core import synthetic
    from voxreg.core.image import Image
    from voxreg.registration import pipeline as api

    source = io.load_image(scan)
    directions = source.affine[:3, :3] / np.linalg.norm(source.affine[:3, :3], axis=0)
    centre = source.affine @ np.r_[(np.asarray(source.shape) - 1) / 2.0, 1.0]
    affine = np.eye(4)
    affine[:3, :3] = directions * spacing
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    reference = Image(np.zeros(shape, np.float32), affine)
    fixed = api.warp_image(source, reference)
    field = synthetic.smooth_random_field(shape, max_mm / spacing, smooth_mm / spacing, seed=seed)
    moving = api.warp_image(source, reference, field=field)
    out = Path(folder)
    paths = {
        "fixed": io.save_image(fixed, out / "fixed.nii.gz"),
        "moving": io.save_image(moving, out / "moving.nii.gz"),
    }
    return {**{k: str(v) for k, v in paths.items()}, "max_displacement_mm": float(max_mm), "shape": list(shape)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the large-scan suite."""
    parser.add_argument("--scan", type=Path, default=None, help="real scan to resample (default: the example CT)")
    parser.add_argument("--sizes-mm", type=float, nargs="+", default=None, help=f"spacings (default {SIZES_MM})")
    parser.add_argument("--max-mm", type=float, default=8.0, help="largest displacement of the known field, mm")
    parser.add_argument("--smooth-mm", type=float, default=60.0, help="correlation length of the known field, mm")
    parser.add_argument("--engine", default=None, help="--engine of voxreg register (default: its own, auto)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per registration")


def register_size(spacing: float, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Make the pair at ``spacing`` and register it in a fresh process."""
    shape = grid_shape(spacing)
    made = timing.measure_call(
        "benchmarks.suites.large_scan:make_pair",
        {"scan": str(args.scan), "folder": str(folder), "spacing": spacing, "shape": list(shape)}
        | {"max_mm": args.max_mm, "smooth_mm": args.smooth_mm},
        repeats=1,
    )["value"]
    argv = [sys.executable, "-m", "voxreg.cli", "register", made["fixed"], made["moving"], "-o", str(folder / "out")]
    argv += ["--no-figure"] + (["--engine", args.engine] if args.engine else [])
    argv += ["--device", args.device] if args.device else []
    run = timing.run_measured(argv, env=timing.child_env(threads=args.threads), timeout=args.timeout)
    row: dict[str, Any] = {
        "spacing_mm": spacing,
        "shape": list(shape),
        "voxels_m": float(shape[0] * shape[1] * shape[2]) / 1e6,
        "wall_s": run["wall_s"],
        "peak_rss_mb": run["peak_rss_mb"],
        "returncode": run["returncode"],
        "timed_out": run["timed_out"],
    }
    if run["returncode"] != 0:
        row["error"] = (run["stderr_tail"].strip().splitlines() or ["?"])[-1]
    metrics_file = folder / "out" / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        row |= {"stages_s": timing.stage_seconds(metrics), "engine": metrics.get("engine")}
        row |= {"ncc_after": metrics.get("similarity", {}).get("ncc_after"), "folding": metrics.get("folding_percent")}
    print(f"[large-scan] {spacing} mm {shape}: {row['wall_s']:.1f} s, {row['peak_rss_mb'] / 1024:.2f} GB", flush=True)
    return row


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Every size in turn (smallest first); the rows."""
    args.scan = args.scan or pairs.ct_scan(args.data)[0]
    if not Path(args.scan).is_file():
        print(f"skipped: {args.scan} not found (real data is not shipped with voxreg)")
        return None
    sizes = args.sizes_mm or (QUICK_SIZES_MM if args.quick else SIZES_MM)
    rows = []
    for spacing in sorted(sizes, reverse=True):
        with tempfile.TemporaryDirectory(prefix="voxreg-large-") as tmp:
            rows.append(register_size(spacing, args, Path(tmp)))
    scan = Path(args.scan)
    return {"scan": f"{scan.parent.name}/{scan.name}", "max_mm": args.max_mm, "smooth_mm": args.smooth_mm, "rows": rows}


def render(document: dict[str, Any]) -> str:
    """One line per size."""
    lines = [
        f"Scan: `{document['scan']}` resampled finer, moving = the same through a known smooth field "
        f"(at most {document['max_mm']:g} mm, correlation length {document['smooth_mm']:g} mm).",
        "",
        "| grid | spacing | voxels | engine | wall s | peak memory GB | deformable s | pipeline s | NCC after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in document["rows"]:
        stages = r.get("stages_s") or {}
        fmt = lambda v, d=1: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
        engine = r.get("engine") or ("FAILED: " + r.get("error", "?") if r.get("returncode") else "–")
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['spacing_mm']:g} mm | {r['voxels_m']:.1f} M | {engine} | "
            f"{fmt(r['wall_s'])} | {fmt(r['peak_rss_mb'] / 1024, 2)} | {fmt(stages.get('registration_seconds'))} | "
            f"{fmt(stages.get('pipeline_seconds'))} | {fmt(r.get('ncc_after'), 3)} |"
        )
    return "\n".join(lines) + "\n"
