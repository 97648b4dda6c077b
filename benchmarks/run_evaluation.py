"""Run `voxreg evaluate` on the real pairs in ../shared/data and write the tables into
docs/benchmarks.md (between the `<!-- evaluation:begin -->` / `<!-- evaluation:end -->` markers).

Sets (``--sets``, comma-separated):
  mindboggle      OASIS-TRT-20 2->1, 4->3, ..., 16->15 in native space, DKT31/CMA manual labels
                  (labels 0 and 74 not scored): affine, ANTs SyN, voxreg instance optimisation
  mindboggle-mni  validation subjects 13-16 after `voxreg preprocess` (MNI152, 2 mm), with the
                  trained network: affine, ANTs SyN, instance, network, network + refinement
                  (needs --model and --preprocessed)
  ct              simulated multi-phase liver CT (benchmarks/multiphase_ct.py output folder,
                  --multiphase DIR): affine, instance NCC, instance MI
  2d              ANTs slices r64->r16, r85->r27, OASIS 2D B->A, ITKElastix CT head (masks as labels)
  cardiac         MyoPS T2 -> bSSFP of 4 patients with a known smooth in-plane perturbation (TRE of
                  200 landmarks), and T2 -> its unperturbed self as control: affine, ANTs SyN,
                  default (voxreg register with no options), instance with MI
With a shipped default model, mindboggle adds `network` (the model alone) and `default`
(voxreg register with no options: the model + its refinement); ct and 2d add `default`.

Usage: python benchmarks/run_evaluation.py [--sets mindboggle,2d] [--out /tmp/voxreg_eval]
       [--model best.pt --preprocessed /tmp/mb_pre] [--multiphase /tmp/multiphase_ct] [--docs]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from voxreg.nn.shipped import default_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MARK_BEGIN, MARK_END = "<!-- evaluation:begin -->", "<!-- evaluation:end -->"


def write_pairs(path: Path, rows: list[dict[str, str]]) -> Path:
    """A pairs CSV for `voxreg evaluate`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["id", "fixed", "moving", "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def mindboggle_rows(data: Path) -> list[dict[str, str]]:
    base = data / "brain_mri" / "mindboggle_oasis_trt20"
    rows = []
    for k in range(1, 9):
        f, m = base / f"OASIS-TRT-20-{2 * k - 1}", base / f"OASIS-TRT-20-{2 * k}"
        rows.append(
            {
                "id": f"{2 * k}->{2 * k - 1}",
                "fixed": f / "t1weighted_brain.nii.gz",
                "moving": m / "t1weighted_brain.nii.gz",
                "fixed_labels": f / "labels_DKT31_CMA.nii.gz",
                "moving_labels": m / "labels_DKT31_CMA.nii.gz",
            }
        )
    return rows


def mni_rows(pre: Path) -> list[dict[str, str]]:
    rows = []
    for m, f in ((14, 13), (16, 15), (13, 14), (15, 16)):
        scan = lambda i: pre / f"OASIS-TRT-20-{i}_t1weighted_brain.nii.gz"  # noqa: E731
        lab = lambda i: pre / f"OASIS-TRT-20-{i}_t1weighted_brain_labels.nii.gz"  # noqa: E731
        rows.append(
            {"id": f"{m}->{f}", "fixed": scan(f), "moving": scan(m), "fixed_labels": lab(f), "moving_labels": lab(m)}
        )
    return rows


def two_d_rows(data: Path) -> list[dict[str, str]]:
    sl, ct = data / "brain_2d" / "antspy_slices", data / "ct_2d" / "itkelastix_ct2d_head"
    oasis = data / "brain_2d" / "oasis_2d_pair"
    return [
        {"id": "r64->r16", "fixed": sl / "r16slice.nii.gz", "moving": sl / "r64slice.nii.gz"},
        {"id": "r85->r27", "fixed": sl / "r27slice.nii.gz", "moving": sl / "r85slice.nii.gz"},
        {"id": "oasis2d B->A", "fixed": oasis / "image_A_2D.nii.gz", "moving": oasis / "image_B_2D.nii.gz"},
        {
            "id": "CT head moving->fixed",
            "fixed": ct / "CT_2D_head_fixed.nii.gz",
            "moving": ct / "CT_2D_head_moving.nii.gz",
            "fixed_labels": ct / "CT_2D_head_fixed_mask.nii.gz",
            "moving_labels": ct / "CT_2D_head_moving_mask.nii.gz",
        },
    ]


def _smooth_in_plane_field(shape: tuple[int, ...], spacing: np.ndarray, max_mm: float, seed: int) -> np.ndarray:
    """A smooth random in-plane displacement ``(3, *shape)`` in voxels (axes 0 and 1 only,
    varying smoothly across slices), at most ``max_mm`` long: a synthetic perturbation."""
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
    in the tissue of the perturbed scan, so that the target registration error (TRE) is known
    if C0 and T2 coincide; the same perturbed T2 -> the original T2 is the control where the
    perturbation is the only motion. Written under ``out`` (never into the repository)."""
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
                    "fixed": base / f"{patient}_{fixed}.nii.gz",
                    "moving": moving_path,
                    "fixed_landmarks": names["fixed"],
                    "moving_landmarks": names["moving"],
                }
            )
    return rows


def write_organ_table(path: Path, labels_csv: Path) -> Path:
    """The organs scored on the multi-phase CT (liver, spleen, kidneys) as a code,name table."""
    wanted = {"liver", "spleen", "kidney_left", "kidney_right"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(labels_csv, newline="") as handle:
        rows = [(r["value"], r["name"]) for r in csv.DictReader(handle) if r["name"] in wanted]
    path.write_text("code,name\n" + "".join(f"{code},{name}\n" for code, name in rows))
    return path


DOCS_ONLY = False


def evaluate(pairs: Path, out: Path, methods: str, *extra: str) -> None:
    """One `voxreg evaluate` run in a fresh process (ANTs reads its thread count once)."""
    if DOCS_ONLY:
        return
    cmd = [
        sys.executable,
        "-m",
        "voxreg.cli",
        "evaluate",
        str(pairs),
        "-o",
        str(out),
        "--methods",
        methods,
        "--device",
        "cpu",
        *extra,
    ]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "COLUMNS": "120"})


def versions() -> str:
    import torch

    import voxreg

    parts = [
        f"voxreg {getattr(voxreg, '__version__', '?')}",
        f"torch {torch.__version__}",
        f"python {platform.python_version()}",
    ]
    try:
        import ants

        parts.append(f"antspyx {ants.__version__}")
    except ImportError:
        parts.append("antspyx not installed")
    return ", ".join(parts)


def update_docs(sections: list[tuple[str, str, Path]], docs: Path) -> None:
    """Replace the generated block of docs/benchmarks.md with the tables of ``sections``."""
    cpu = platform.processor() or platform.machine()
    head = [
        MARK_BEGIN,
        "",
        f"Generated by `python benchmarks/run_evaluation.py` on "
        f"{datetime.date.today().isoformat()}: {os.cpu_count()} CPU cores ({cpu}), no GPU; {versions()}.",
        "",
    ]
    for title, command, out in sections:
        table = (out / "table.md").read_text() if (out / "table.md").is_file() else "(no table written)\n"
        table = "\n".join(
            line.replace("## ", "#### ", 1) if line.startswith("## ") else line
            for line in table.splitlines()
            if not line.startswith("# ")
        )
        head += [f"### {title}", "", f"Command: `{command}` (report: `{out}/report.html`)", "", table, ""]
    head.append(MARK_END)
    text = docs.read_text() if docs.is_file() else "# Benchmarks\n"
    if MARK_BEGIN in text and MARK_END in text:
        before, rest = text.split(MARK_BEGIN, 1)
        text = before + "\n".join(head) + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Evaluation suite (`voxreg evaluate`)\n\n" + "\n".join(head) + "\n"
    docs.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="mindboggle,2d")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("/tmp/voxreg_eval"))
    parser.add_argument("--model", type=Path)
    parser.add_argument("--lambda", dest="lam", type=float)
    parser.add_argument("--preprocessed", type=Path)
    parser.add_argument("--multiphase", type=Path, default=Path("/tmp/multiphase_ct"))
    parser.add_argument("--docs", action="store_true", help="write the tables into docs/benchmarks.md")
    parser.add_argument("--docs-only", action="store_true", help="only rewrite the docs from existing results")
    args = parser.parse_args()
    global DOCS_ONLY
    DOCS_ONLY = args.docs_only
    args.docs = args.docs or args.docs_only
    if not args.data.is_dir():
        sys.exit(f"shared data not found at {args.data} (pass --data)")
    sections = []
    for name in args.sets.split(","):
        out = args.out / name
        if name == "mindboggle":
            pairs = write_pairs(out / "pairs.csv", mindboggle_rows(args.data))
            extra = ["--exclude-labels", "0,74"]
            methods = "affine,ants-syn,instance"
            shipped = default_model(3)
            if shipped is not None:  # the shipped model alone, and the default (model + refinement)
                extra += ["--model", shipped.name]
                methods += ",network,default"
            evaluate(pairs, out, methods, *extra)
            title = "Mindboggle OASIS-TRT-20, 8 pairs, native space (98 DKT31/CMA labels)"
        elif name == "mindboggle-mni":
            if args.model is None or args.preprocessed is None:
                sys.exit("mindboggle-mni needs --model and --preprocessed")
            pairs = write_pairs(out / "pairs.csv", mni_rows(args.preprocessed))
            extra = ["--exclude-labels", "0,74", "--model", str(args.model)]
            extra += ["--lambda", str(args.lam)] if args.lam is not None else []
            evaluate(pairs, out, "affine,ants-syn,instance,network,network-refine", *extra)
            title = "Mindboggle validation subjects 13-16 in MNI152 2 mm space, with the trained network"
        elif name == "ct":
            pairs = args.multiphase / "pairs.csv"
            table = args.data / "ct" / "totalsegmentator_example" / "labels.csv"
            organs = write_organ_table(out / "organs.csv", table)
            evaluate(pairs, out / "ncc", "affine,instance,default", "--similarity", "ncc", "--structures", str(organs))
            evaluate(pairs, out / "mi", "instance", "--similarity", "mi", "--structures", str(organs))
            sections.append(
                (
                    "Simulated multi-phase liver CT, instance optimisation with NCC",
                    f"voxreg evaluate {pairs} -o {out / 'ncc'} --methods affine,instance,default --structures {organs}",
                    out / "ncc",
                )
            )
            sections.append(
                (
                    "Simulated multi-phase liver CT, instance optimisation with MI",
                    f"voxreg evaluate {pairs} -o {out / 'mi'} --methods instance --similarity mi --structures {organs}",
                    out / "mi",
                )
            )
            continue
        elif name == "2d":
            pairs, extra = write_pairs(out / "pairs.csv", two_d_rows(args.data)), []
            evaluate(pairs, out, "affine,ants-syn,instance,default")
            title = "2D pairs (ANTs slices, OASIS 2D, CT head with masks)"
        elif name == "cardiac":
            pairs = write_pairs(out / "pairs.csv", cardiac_rows(args.data, out))
            evaluate(pairs, out / "ncc", "affine,ants-syn,default")
            evaluate(pairs, out / "mi", "instance", "--similarity", "mi")
            for kind, methods in (("ncc", "affine,ants-syn,default"), ("mi", "instance --similarity mi")):
                sections.append(
                    (
                        f"Cardiac MR T2 -> bSSFP, known in-plane perturbation (4 MyoPS patients), {kind}",
                        f"voxreg evaluate {pairs} -o {out / kind} --methods {methods}",
                        out / kind,
                    )
                )
            continue
        else:
            sys.exit(f"unknown set {name!r}")
        command = f"voxreg evaluate {pairs} -o {out} " + " ".join(extra)
        sections.append((title, command.strip(), out))
    if args.docs:
        update_docs(sections, ROOT / "docs" / "benchmarks.md")
        print(f"updated {ROOT / 'docs' / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
