"""Accuracy through `voxreg evaluate` on the real pairs of ../shared/data (port of the retired
run_evaluation.py). Sets (``--sets``, comma-separated; each is one `voxreg evaluate` process):

  mindboggle      OASIS-TRT-20 2->1, 4->3, ..., 16->15 in native space, DKT31/CMA manual labels
                  (0 and 74 not scored): affine, ANTs SyN, instance, and with the shipped model
                  network (the model alone) and default (`voxreg register` with no options)
  mindboggle-mni  validation subjects 13-16 after `voxreg preprocess` (MNI152, 2 mm) with a trained
                  network (needs --model and --preprocessed)
  ct              simulated multi-phase liver CT (benchmarks/multiphase_ct.py's output, --multiphase):
                  affine, instance NCC, default; instance MI
  2d              ANTs slices r64->r16, r85->r27, OASIS 2D B->A, ITKElastix CT head (masks as labels)
  cardiac         MyoPS T2 -> bSSFP of 4 patients with a known smooth in-plane perturbation (TRE of 200
                  landmarks) and T2 -> its unperturbed self as control: affine, ANTs SyN, default; instance MI

Each set's table is voxreg evaluate's own table.md, kept in the JSON; a run updates the sets it ran
and keeps the others. ``--quick``: Mindboggle 2->1 only, affine and the network.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import pairs, results, timing

SUMMARY = "accuracy via `voxreg evaluate`: Mindboggle (affine, network, default, instance, ANTs SyN), CT, 2D, cardiac"
SETS = ("mindboggle", "mindboggle-mni", "ct", "2d", "cardiac")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the evaluation suite."""
    parser.add_argument("--sets", default="mindboggle", help=f"comma-separated, of {', '.join(SETS)}")
    parser.add_argument("--pairs", type=int, default=None, help="Mindboggle: only the first N pairs")
    parser.add_argument("--methods", default=None, help="override the methods of the Mindboggle set")
    parser.add_argument("--work", type=Path, default=Path("/tmp/voxreg_eval"), help="voxreg evaluate outputs")
    parser.add_argument("--model", type=Path, help="mindboggle-mni: the trained network")
    parser.add_argument("--lambda", dest="lam", type=float)
    parser.add_argument("--passes", type=int, help="mindboggle: the network's passes (voxreg evaluate --passes)")
    parser.add_argument("--preprocessed", type=Path, help="mindboggle-mni: `voxreg preprocess` output folder")
    parser.add_argument(
        "--multiphase", type=Path, default=Path("/tmp/multiphase_ct"), help="ct: multiphase_ct.py output"
    )
    parser.add_argument("--device", default="cpu")


def evaluate(pairs_csv: Path, out: Path, methods: str, device: str, *extra: str) -> dict[str, Any]:
    """One `voxreg evaluate` run in a fresh process (ANTs reads its thread count once);
    returns the command, its wall seconds, peak memory and table.md."""
    argv = [sys.executable, "-m", "voxreg.cli", "evaluate", str(pairs_csv), "-o", str(out), "--methods", methods]
    argv += ["--device", device, *extra]
    print("$", " ".join(argv[2:]), flush=True)
    run = timing.run_measured(argv, env=timing.child_env(COLUMNS="120"))
    if run["returncode"] != 0:
        raise RuntimeError(f"voxreg evaluate failed: {run['stderr_tail'].strip()[-500:]}")
    table = out / "table.md"
    return {
        "command": "voxreg " + " ".join(argv[3:]),
        "wall_s": run["wall_s"],
        "peak_rss_mb": run["peak_rss_mb"],
        "table": table.read_text(encoding="utf-8") if table.is_file() else "(no table written)\n",
    }


def _smooth_in_plane_field(shape: tuple[int, ...], spacing: np.ndarray, max_mm: float, seed: int) -> np.ndarray:
    """A smooth random in-plane displacement ``(3, *shape)`` in voxels (axes 0 and 1 only,
    varying smoothly across slices), at most ``max_mm`` long: a synthetic perturbation."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((2, 4, 4, 2))
    field = np.zeros((3, *shape), np.float32)
    for axis in range(2):
        zoom = [n / c for n, c in zip(shape, coarse.shape[1:])]
        field[axis] = ndimage.zoom(coarse[axis], zoom, order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]
    length_mm = np.sqrt((field[0] * spacing[0]) ** 2 + (field[1] * spacing[1]) ** 2)
    return field * (max_mm / length_mm.max())


def cardiac_rows(data: Path, out: Path, max_mm: float = 6.0, landmarks: int = 200) -> list[dict[str, str]]:
    """T2 -> bSSFP (C0) of the 4 MyoPS patients (aligned by the organisers): the T2 scan is
    warped by a known smooth in-plane perturbation (up to ``max_mm``), and landmarks are drawn
    in the tissue of the perturbed scan, so that the target registration error is known if C0
    and T2 coincide; the perturbed T2 -> the original T2 is the control where the perturbation
    is the only motion. Written under ``out`` (never into the repository)."""
    import nibabel as nib
    from scipy import ndimage

    base = data / "cardiac_mr" / "myops_multisequence"
    rows = []
    for patient in (101, 102, 103, 104):
        t2 = nib.load(base / f"{patient}_T2.nii.gz")
        array = np.asarray(t2.dataobj, dtype=np.float32)
        spacing = np.asarray(t2.header.get_zooms()[:3], dtype=float)
        field = _smooth_in_plane_field(array.shape, spacing, max_mm, seed=patient)
        grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in array.shape], indexing="ij")
        # moving(x) = T2(x + u(x)): the anatomy at fixed point x + u(x) sits at x in the moving scan
        moved = ndimage.map_coordinates(array, [g + f for g, f in zip(grid, field)], order=1, mode="nearest")
        moving_path = out / "inputs" / f"{patient}_T2_perturbed.nii.gz"
        moving_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(moved.astype(np.float32), t2.affine), moving_path)
        rng = np.random.default_rng(patient)
        centre = np.zeros(array.shape, bool)
        centre[array.shape[0] // 4 : 3 * array.shape[0] // 4, array.shape[1] // 4 : 3 * array.shape[1] // 4] = True
        tissue = np.argwhere(centre & (moved > np.percentile(moved[centre], 60)))
        points = tissue[rng.choice(len(tissue), size=landmarks, replace=False)].astype(float)
        fixed_points = points + np.stack([ndimage.map_coordinates(f, points.T, order=1) for f in field], axis=1)
        names = {}
        for side, voxels in (("fixed", fixed_points), ("moving", points)):
            world = nib.affines.apply_affine(t2.affine, voxels)
            names[side] = out / "inputs" / f"{patient}_{side}_landmarks.csv"
            np.savetxt(names[side], world, delimiter=",", header="x,y,z", comments="", fmt="%.4f")
        for fixed in ("C0", "T2"):  # T2 -> T2: the same contrast, where the perturbation is the only motion
            rows.append(
                {
                    "id": f"{patient} T2->{fixed}",
                    "fixed": str(base / f"{patient}_{fixed}.nii.gz"),
                    "moving": str(moving_path),
                    "fixed_landmarks": str(names["fixed"]),
                    "moving_landmarks": str(names["moving"]),
                }
            )
    return rows


def mni_pairs(pre: Path) -> list[pairs.Pair]:
    """Validation pairs 14->13, 16->15, 13->14, 15->16 of a `voxreg preprocess` output folder."""
    scan = lambda i: pre / f"OASIS-TRT-20-{i}_t1weighted_brain.nii.gz"  # noqa: E731
    lab = lambda i: pre / f"OASIS-TRT-20-{i}_t1weighted_brain_labels.nii.gz"  # noqa: E731
    return [
        pairs.Pair(f"{m}->{f}", scan(f), scan(m), lab(f), lab(m)) for m, f in ((14, 13), (16, 15), (13, 14), (15, 16))
    ]


def write_organ_table(path: Path, labels_csv: Path) -> Path:
    """The organs scored on the multi-phase CT (liver, spleen, kidneys) as a code,name table."""
    wanted = {"liver", "spleen", "kidney_left", "kidney_right"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(labels_csv, newline="") as handle:
        rows = [(r["value"], r["name"]) for r in csv.DictReader(handle) if r["name"] in wanted]
    path.write_text("code,name\n" + "".join(f"{code},{name}\n" for code, name in rows))
    return path


def run_set(name: str, args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """Run one set; returns (key, title, evaluate's result) per table it makes."""
    out, data, device = args.work / name, args.data, args.device
    if name == "mindboggle":
        count = 1 if args.quick else args.pairs
        csv_path = pairs.write_pairs_csv(out / "pairs.csv", pairs.mindboggle_pairs(count, data), all_columns=True)
        extra, methods = ["--exclude-labels", "0,74"], "affine,ants-syn,instance"
        extra += ["--passes", str(args.passes)] if args.passes is not None else []
        from voxreg.nn.shipped import default_model

        if default_model(3) is not None:  # the shipped network alone, and the default (model + refinement)
            methods += ",network,default"  # each runs the model voxreg register picks for it
        methods = args.methods or ("affine,network" if args.quick else methods)
        n = count or len(pairs.MINDBOGGLE_PAIRS)
        title = f"Mindboggle OASIS-TRT-20, {n} pair{'s' * (n > 1)}, native space (98 DKT31/CMA labels)"
        return [(name, title, evaluate(csv_path, out, methods, device, *extra))]
    if name == "mindboggle-mni":
        if args.model is None or args.preprocessed is None:
            raise SystemExit("mindboggle-mni needs --model and --preprocessed")
        csv_path = pairs.write_pairs_csv(out / "pairs.csv", mni_pairs(args.preprocessed), all_columns=True)
        extra = ["--exclude-labels", "0,74", "--model", str(args.model)]
        extra += ["--lambda", str(args.lam)] if args.lam is not None else []
        title = "Mindboggle validation subjects 13-16 in MNI152 2 mm space, with the trained network"
        return [
            (name, title, evaluate(csv_path, out, "affine,ants-syn,instance,network,network-refine", device, *extra))
        ]
    if name == "ct":
        csv_path = args.multiphase / "pairs.csv"
        if not csv_path.is_file():
            raise SystemExit(f"{csv_path} not found: run `python benchmarks/multiphase_ct.py --out {args.multiphase}`")
        organs = write_organ_table(out / "organs.csv", pairs.ct_scan(data)[2])
        tables = []
        for kind, methods in (("ncc", "affine,instance,default"), ("mi", "instance")):
            result = evaluate(csv_path, out / kind, methods, device, "--similarity", kind, "--structures", str(organs))
            title = f"Simulated multi-phase liver CT, instance optimisation with {kind.upper()}"
            tables.append((f"ct-{kind}", title, result))
        return tables
    if name == "2d":
        csv_path = pairs.write_pairs_csv(out / "pairs.csv", pairs.two_d_pairs(data), all_columns=True)
        title = "2D pairs (ANTs slices, OASIS 2D, CT head with masks)"
        return [(name, title, evaluate(csv_path, out, "affine,ants-syn,instance,default", device))]
    if name == "cardiac":
        csv_path = pairs.write_pairs_csv(out / "pairs.csv", cardiac_rows(data, out), all_columns=True)
        tables = []
        for kind, methods, extra in (
            ("ncc", "affine,ants-syn,default", []),
            ("mi", "instance", ["--similarity", "mi"]),
        ):
            title = f"Cardiac MR T2 -> bSSFP, known in-plane perturbation (4 MyoPS patients), {kind}"
            tables.append((f"cardiac-{kind}", title, evaluate(csv_path, out / kind, methods, device, *extra)))
        return tables
    raise SystemExit(f"unknown set {name!r} (sets: {', '.join(SETS)})")


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the sets asked for; merge them into the sets already in the output JSON."""
    if not args.data.is_dir():
        print(f"skipped: shared data not found at {args.data} (pass --data)")
        return None
    names = ["mindboggle"] if args.quick else args.sets.split(",")
    out = args.out or (None if args.quick else results.result_path("evaluation"))
    previous = json.loads(out.read_text(encoding="utf-8")) if out and out.is_file() else {}
    sets: dict[str, Any] = dict(previous.get("sets", {}))
    stamp = {
        "date": datetime.date.today().isoformat(),
        "git_revision": results.git_revision(),
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
    }
    for name in names:
        for key, title, result in run_set(name, args):
            sets[key] = {"title": title, **stamp, **result}
    return {"sets": sets}


def _table(text: str) -> str:
    """voxreg evaluate's table.md without its title, its sub-headings one level down."""
    lines = [line for line in text.splitlines() if not line.startswith("# ")]
    return "\n".join(line.replace("## ", "#### ", 1) if line.startswith("## ") else line for line in lines).strip()


def render(document: dict[str, Any]) -> str:
    """One section per table: title, the command, when it ran, voxreg evaluate's table."""
    order = ["mindboggle", "mindboggle-mni", "cardiac-ncc", "cardiac-mi", "ct-ncc", "ct-mi", "2d"]
    keys = sorted(document.get("sets", {}), key=lambda k: order.index(k) if k in order else len(order))
    parts = []
    for key in keys:
        entry = document["sets"][key]
        parts += [
            f"### {entry['title']}",
            "",
            f"Command: `{entry['command']}` ({entry.get('date')}, revision {entry.get('git_revision')})",
            "",
            _table(entry["table"]),
            "",
        ]
    return "\n".join(parts)
