"""Wall clock of `voxreg register` end to end, per engine (the issue-25 wall-clock table).

Each case is a fresh `python -m voxreg.cli` process, as a user runs it: `voxreg --help`
(start-up alone), `--engine network --refine 0` (the shipped model alone), `--engine instance`
(instance optimisation alone) and the default engine (model + refinement where the model's card
covers the scans). Per case: wall seconds and peak resident memory of that process (its own
rusage) and the stage seconds `voxreg register` writes to metrics.json (affine, deformable,
pipeline = affine + deformable + warp, total = with the metrics). Pair: Mindboggle
OASIS-TRT-20 2 -> 1 (native 1 mm, 256x256x160); `--quick`: the 2 mm MNI152 demo pair.
`--src DIR` measures another source tree (e.g. a `git worktree` of an older revision).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import pairs, timing

SUMMARY = "wall clock + peak memory of `voxreg register` per engine (fresh CLI processes), stage times"
CASES: dict[str, list[str]] = {
    "voxreg --help": ["--help"],
    "network, --refine 0": ["--engine", "network", "--refine", "0"],
    "instance": ["--engine", "instance"],
    "default": [],
    "network, --refine 0, lean": ["--engine", "network", "--refine", "0", "--no-inverse", "--no-itk", "--no-figure"],
    "instance, lean": ["--engine", "instance", "--no-inverse", "--no-itk", "--no-figure"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the speed suite."""
    parser.add_argument("--pair", default="2:1", help="Mindboggle moving:fixed subject numbers")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per case (median reported)")
    parser.add_argument("--device", default=None, help="--device for voxreg register (default: its own, auto)")
    parser.add_argument("--labels", action="store_true", help="also carry the label maps (Dice in metrics.json)")
    parser.add_argument("--src", type=Path, default=None, help="voxreg source tree to measure (default: installed)")
    parser.add_argument("--threads", type=int, default=None, help="OMP/ITK threads of the children")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")


def register_argv(case: str, pair: pairs.Pair, out: Path, device: str | None, labels: bool) -> list[str]:
    """The command line of one case (``python -m voxreg.cli ...``)."""
    if case == "voxreg --help":
        return [sys.executable, "-m", "voxreg.cli", "--help"]
    argv = [sys.executable, "-m", "voxreg.cli", "register", str(pair.fixed), str(pair.moving), "-o", str(out)]
    if labels and pair.moving_labels and pair.fixed_labels:
        argv += ["--moving-labels", str(pair.moving_labels), "--fixed-labels", str(pair.fixed_labels)]
    return argv + CASES[case] + (["--device", device] if device else [])


def measure_case(case: str, pair: pairs.Pair, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One fresh process of ``case``: wall, peak memory and metrics.json's stage seconds."""
    out = folder / case.replace(" ", "_").replace(",", "").replace("-", "")
    run = timing.run_measured(
        register_argv(case, pair, out, args.device, args.labels),
        env=timing.child_env(args.src, args.threads),
        timeout=args.timeout,
    )
    row: dict[str, Any] = {
        "case": case,
        "wall_s": run["wall_s"],
        "peak_rss_mb": run["peak_rss_mb"],
        "returncode": run["returncode"],
    }
    if run["returncode"] != 0:
        row["error"] = (run["stderr_tail"].strip().splitlines() or ["?"])[-1]
    metrics_file = out / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        row["stages_s"] = timing.stage_seconds(metrics)
        row["engine"] = metrics.get("engine")
        if "dice_mean_after" in metrics:
            row["dice_mean_after"] = metrics["dice_mean_after"]
    return row


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Every case ``--repeats`` times; the rows and the pair measured."""
    with tempfile.TemporaryDirectory(prefix="voxreg-speed-") as tmp:
        folder = Path(tmp)
        if args.quick:
            pair = pairs.write_demo_pair(folder / "inputs", resolution_mm=2)
        else:
            pair = pairs.parse_pairs([args.pair], args.data)[0]
            if not pair.exists():
                print(f"skipped: {pair.fixed.parent.parent} not found (real data is not shipped with voxreg)")
                return None
        rows = []
        for repeat in range(args.repeats):
            for case in args.cases:
                row = {**measure_case(case, pair, args, folder / f"r{repeat}"), "repeat": repeat}
                rows.append(row)
                print(f"[speed] {case}: {row['wall_s']:.1f} s wall, {row['peak_rss_mb']:.0f} MB", flush=True)
    return {"pair": pair.id, "quick": args.quick, "src": str(args.src) if args.src else None, "rows": rows}


def _median(rows: list[dict[str, Any]], key: str, stage: bool = False) -> float | None:
    """Median of ``key`` (a row key, or a stage of ``stages_s``) over rows that have it."""
    values = [(r.get("stages_s") or {}).get(key) if stage else r.get(key) for r in rows]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _cell(value: float | None, digits: int = 1) -> str:
    """A number or a dash."""
    return "–" if value is None else f"{value:.{digits}f}"


def render(document: dict[str, Any]) -> str:
    """Markdown table: one line per case, medians over repeats."""
    lines = [
        f"Pair: {document.get('pair')}; median of {max(r.get('repeat', 0) for r in document['rows']) + 1} "
        "fresh process(es) per case.",
        "",
        "| case | engine | wall s | peak memory GB | affine s | deformable s | pipeline s | total s (with metrics) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in dict.fromkeys(r["case"] for r in document["rows"]):
        rows = [r for r in document["rows"] if r["case"] == case]
        failed = [r for r in rows if r.get("returncode")]
        peak = _median(rows, "peak_rss_mb")
        cells = [
            case,
            rows[0].get("engine") or ("FAILED: " + failed[0].get("error", "?") if failed else "–"),
            _cell(_median(rows, "wall_s")),
            _cell(None if peak is None else peak / 1024, 2),
            _cell(_median(rows, "affine.seconds", stage=True), 2),
            _cell(_median(rows, "registration_seconds", stage=True), 2),
            _cell(_median(rows, "pipeline_seconds", stage=True), 2),
            _cell(_median(rows, "total_seconds", stage=True), 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
