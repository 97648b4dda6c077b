"""The same numbers from two source trees in one run: the demo and a Mindboggle pair (2->1,
native 1 mm, affine + instance optimisation, manual labels), each through the CLI of that
tree (``python -m voxreg.cli``), read back from metrics.json. Used to show a refactor left
Dice, folding and time unchanged. Exits cleanly without ../shared/data (demo only).

Usage: python benchmarks/compare_revisions.py OLD_SRC NEW_SRC [--pair 2:1]
(e.g. OLD_SRC = a `git worktree add /tmp/base <commit>` checkout's src folder)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain_mri" / "mindboggle_oasis_trt20"


def _run(src: Path, args: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "voxreg.cli", *args, "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{src}: {' '.join(args[:1])} failed: {proc.stderr.strip()[-500:]}")
    values = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    values["wall_seconds"] = wall
    return values


def _row(name: str, label: str, values: dict) -> str:
    dice = values.get("dice_mean_after")
    demo = values.get("demo", {})
    epe = demo.get("endpoint_error_after_voxels")
    return (
        f"| {name} | {label} | {dice if dice is None else f'{dice:.4f}'} | {values.get('folding_percent', float('nan')):.4f} | "
        f"{'' if epe is None else f'{epe:.4f}'} | {values.get('pipeline_seconds', float('nan')):.1f} | {values['wall_seconds']:.1f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--pair", default="2:1")
    args = parser.parse_args()
    moving_id, fixed_id = (int(v) for v in args.pair.split(":"))
    print("| case | tree | Dice mean after | % folding | demo EPE after (vox) | pipeline s | wall s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, src in (("old", args.old), ("new", args.new)):
            print(_row("demo", label, _run(src, ["demo"], Path(tmp) / f"demo_{label}")), flush=True)
        if not DATA.is_dir():
            print(f"(Mindboggle pair skipped: {DATA} not found)")
            return 0
        fixed = DATA / f"OASIS-TRT-20-{fixed_id}"
        moving = DATA / f"OASIS-TRT-20-{moving_id}"
        pair = [
            str(fixed / "t1weighted_brain.nii.gz"),
            str(moving / "t1weighted_brain.nii.gz"),
            "--moving-labels",
            str(moving / "labels_DKT31_CMA.nii.gz"),
            "--fixed-labels",
            str(fixed / "labels_DKT31_CMA.nii.gz"),
            "--no-figure",
            "--device",
            "cpu",
        ]
        for label, src in (("old", args.old), ("new", args.new)):
            print(
                _row(f"Mindboggle {args.pair}", label, _run(src, ["register", *pair], Path(tmp) / f"pair_{label}")),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
