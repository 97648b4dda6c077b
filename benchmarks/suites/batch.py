"""Throughput of `voxreg register-batch`: pairs per minute over Mindboggle pairs (native 1 mm),
one fresh process (the model loaded once, reading and writing overlapped with compute), with
its wall seconds, peak memory and the per-pair seconds and status from its batch.csv.
Default: the first 4 pairs, default engine. ``--quick``: 1 pair, ``--engine network --refine 0``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import pairs, timing

SUMMARY = "`voxreg register-batch` pairs per minute on Mindboggle pairs (one fresh process)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the batch suite."""
    parser.add_argument("--pairs", type=int, default=4, help="the first N Mindboggle pairs (at most 8)")
    parser.add_argument("--engine", default=None, help="--engine of register-batch (default: its own, auto)")
    parser.add_argument("--refine", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="--workers (IO threads) of register-batch")
    parser.add_argument("--device", default=None)
    parser.add_argument("--src", type=Path, default=None, help="voxreg source tree to measure (default: installed)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument(
        "--lean", action="store_true", help="--no-inverse --no-itk --no-figure: the fewest files a cohort run needs"
    )


def batch_argv(csv_path: Path, out: Path, args: argparse.Namespace) -> list[str]:
    """The `register-batch` command line."""
    argv = [sys.executable, "-m", "voxreg.cli", "register-batch", str(csv_path), "-o", str(out)]
    for flag, value in (("--engine", args.engine), ("--refine", args.refine), ("--workers", args.workers)):
        argv += [flag, str(value)] if value is not None else []
    argv += ["--no-inverse", "--no-itk", "--no-figure"] if getattr(args, "lean", False) else []
    return argv + (["--device", args.device] if args.device else [])


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """One register-batch process over the pairs; its rate and per-pair rows."""
    if args.quick:
        args.pairs, args.engine, args.refine = 1, args.engine or "network", 0 if args.refine is None else args.refine
    chosen = pairs.mindboggle_pairs(args.pairs, args.data)
    if not all(p.exists() for p in chosen):
        print(f"skipped: Mindboggle pairs not found under {args.data}")
        return None
    with tempfile.TemporaryDirectory(prefix="voxreg-batch-") as tmp:
        plain = [pairs.Pair(p.id.replace("->", "_to_"), p.fixed, p.moving) for p in chosen]  # ids as folder names
        csv_path = pairs.write_pairs_csv(Path(tmp) / "pairs.csv", plain)
        argv = batch_argv(csv_path, Path(tmp) / "out", args)
        run = timing.run_measured(argv, env=timing.child_env(args.src, args.threads), timeout=args.timeout)
        table = Path(tmp) / "out" / "batch.csv"
        rows = list(csv.DictReader(open(table, newline=""))) if table.is_file() else []
    ok = sum(row.get("status") == "ok" for row in rows)
    print(f"[batch] {len(chosen)} pairs in {run['wall_s']:.1f} s ({ok} ok)", flush=True)
    return {
        "batch_command": "voxreg " + " ".join(argv[3:]),
        "engine": args.engine or "auto",
        "outputs": "lean: no inverse, ITK copies or figure" if getattr(args, "lean", False) else "all",
        "pairs": len(chosen),
        "ok": ok,
        "returncode": run["returncode"],
        "wall_s": run["wall_s"],
        "peak_rss_mb": run["peak_rss_mb"],
        "pairs_per_minute": 60.0 * len(chosen) / run["wall_s"],
        "rows": [{k: row.get(k) for k in ("id", "status", "seconds", "error")} for row in rows],
        "error": None if run["returncode"] == 0 else run["stderr_tail"].strip()[-300:],
    }


def render(document: dict[str, Any]) -> str:
    """One line: pairs, engine, wall, rate, peak memory, per-pair seconds."""
    seconds = [float(r["seconds"]) for r in document.get("rows", []) if r.get("seconds")]
    per_pair = f"{min(seconds):.1f}–{max(seconds):.1f}" if seconds else "–"
    return (
        "| pairs (ok) | engine | outputs | wall s | pairs per minute | peak memory GB | s per pair (batch.csv) |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {document['pairs']} ({document['ok']}) | {document['engine']} | {document.get('outputs', 'all')} | "
        f"{document['wall_s']:.1f} | "
        f"**{document['pairs_per_minute']:.1f}** | {document['peak_rss_mb'] / 1024:.2f} | {per_pair} |\n"
    )
