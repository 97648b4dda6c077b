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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MARK_BEGIN, MARK_END = "<!-- evaluation:begin -->", "<!-- evaluation:end -->"


def write_pairs(path: Path, rows: list[dict[str, str]]) -> Path:
    """A pairs CSV for `voxreg evaluate`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["id", "fixed", "moving", "fixed_labels", "moving_labels"]
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
            evaluate(pairs, out, "affine,ants-syn,instance", *extra)
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
            evaluate(pairs, out / "ncc", "affine,instance", "--similarity", "ncc", "--structures", str(organs))
            evaluate(pairs, out / "mi", "instance", "--similarity", "mi", "--structures", str(organs))
            sections.append(
                (
                    "Simulated multi-phase liver CT, instance optimisation with NCC",
                    f"voxreg evaluate {pairs} -o {out / 'ncc'} --methods affine,instance --structures {organs}",
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
            evaluate(pairs, out, "affine,ants-syn,instance")
            title = "2D pairs (ANTs slices, OASIS 2D, CT head with masks)"
        else:
            sys.exit(f"unknown set {name!r}")
        command = f"voxreg evaluate {pairs} -o {out} " + " ".join(extra)
        sections.append((title, command.strip(), out))
    if args.docs:
        update_docs(sections, ROOT / "docs" / "benchmarks.md")
        print(f"updated {ROOT / 'docs' / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
