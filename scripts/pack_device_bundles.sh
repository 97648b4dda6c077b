#!/usr/bin/env bash
# Build the folders that a lent GPU machine (the `device` tool) needs beside the working tree.
# Its image has python3 3.12 with torch (CUDA), numpy, scipy, typer, rich and matplotlib, but no
# nibabel, SimpleITK, isal or nilearn, and no network. The working tree that travels is at most
# 64 MiB, so the packages and the scans travel as xz archives in ignored folders:
#   .device_site/site.tar.xz       nibabel + isal                                  (~3 MB)
#   .device_site_full/site.tar.xz  + SimpleITK + nilearn's MNI152 files (gpu_check)  (~37 MB)
#   .device_data/data.tar.xz       prepared ds002748 scans as int16 + scale        (~33 MB)
# Usage (here, repository root): bash scripts/pack_device_bundles.sh [PREPARED_DATA_DIR [PREPARED_HEADS_DIR]]
#   PREPARED_HEADS_DIR (scripts/prepare_ds002748.py --heads, e.g. OpenfMRI ds000011): its training
#   heads are added to train.csv (heads/...); train_on_device.sh then draws pairs within folders
# Then, with the device tool:
#   run  "export PIP_NO_INDEX=1; mkdir -p /tmp/site && tar xJf .device_site_full/site.tar.xz -C /tmp/site
#         && export PYTHONPATH=/tmp/site && bash benchmarks/gpu_check.sh"   carry [.device_site_full]
#   run  "bash scripts/train_on_device.sh 565 4"                  carry [.device_site, .device_data]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${1:-/work/data/ds002748_prep}"
HEADS="${2:-}"
cd "$ROOT"
source scripts/setup_env.sh
for folder in .device_site .device_site_full .device_data; do
  grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >>.git/info/exclude
  mkdir -p "$folder"
done
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$WORK/wheels" nibabel==5.3.2 SimpleITK==2.5.2 isal==1.9.1
mkdir -p "$WORK/light" "$WORK/full/nilearn/datasets/data"
for wheel in "$WORK"/wheels/nibabel-*.whl "$WORK"/wheels/isal-*.whl; do unzip -q -o "$wheel" -d "$WORK/light"; done
tar cf - -C "$WORK/light" . | xz -T0 -6 >.device_site/site.tar.xz
cp -r "$WORK/light/." "$WORK/full/"
unzip -q -o "$WORK"/wheels/simpleitk-*.whl -d "$WORK/full"
touch "$WORK/full/nilearn/__init__.py"
MNI="$("$VENV_PY" -c 'from voxreg.io.templates import nilearn_data_dir; print(nilearn_data_dir())')"
cp "$MNI"/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz "$WORK/full/nilearn/datasets/data/"
tar cf - -C "$WORK/full" . | xz -T0 -6 >.device_site_full/site.tar.xz
# the scans: int16 with a scale factor (largest error 2e-5 of the [0, 1] range), uncompressed
# NIfTI inside one xz archive (a third of the float32 .nii.gz files' size)
"$VENV_PY" - "$DATA" "$WORK/data" "$HEADS" <<'PY'
import csv, shutil, sys
from pathlib import Path
import nibabel as nib
import numpy as np
source, target = Path(sys.argv[1]), Path(sys.argv[2])
heads = Path(sys.argv[3]) if sys.argv[3] else None
for listing in ("train.csv", "heldout.csv"):
    rows = [(source, row) for row in csv.DictReader(open(source / listing, newline=""))]
    if heads is not None and listing == "train.csv":  # validation stays on the held-out brains
        rows += [(heads, row) for row in csv.DictReader(open(heads / listing, newline=""))]
    for folder, row in rows:
        image = nib.load(folder / row["scan"])
        array = image.get_fdata(dtype=np.float32)
        peak = max(float(array.max()), 1e-12)
        header = image.header.copy()
        header.set_data_dtype(np.int16)
        out = nib.Nifti1Image(np.round(array / peak * 32767).astype(np.int16), image.affine, header)
        out.header.set_slope_inter(peak / 32767, 0.0)
        row["scan"] = row["scan"].removesuffix(".gz")
        (target / row["scan"]).parent.mkdir(parents=True, exist_ok=True)
        nib.save(out, target / row["scan"])
    with open(target / listing, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0][1]))
        writer.writeheader()
        writer.writerows(row for _, row in rows)
print(f"{target}: scans written")
PY
tar cf - -C "$WORK/data" . | xz -T0 -6 >.device_data/data.tar.xz
du -b .device_site/site.tar.xz .device_site_full/site.tar.xz .device_data/data.tar.xz
