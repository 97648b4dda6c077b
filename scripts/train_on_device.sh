#!/usr/bin/env bash
# Continue run brain-real-v2 on a lent GPU machine (the `device` tool), inside a fixed time budget.
#     bash scripts/train_on_device.sh BUDGET_SECONDS [BATCH_SIZE]
# Needs two carried folders made here by `bash scripts/pack_device_bundles.sh`:
#   .device_data/data.tar.xz  the prepared ds002748 scans (CC0; int16 + scale, error < 2e-5)
#   .device_site/site.tar.xz  nibabel + isal (+ SimpleITK in the full bundle) for the image's python3
# Starts from the committed runs/brain-real-v2/weights.pt (a new segment, cosine learning rate),
# times a short probe to size the segment so that it ends inside the budget, and writes to $OUT:
# last.pt (resumable), metrics.csv, snap_*.pt (weights, every ~90 s) and train.log.
set -uo pipefail
BUDGET="${1:?budget seconds}"
BATCH="${2:-4}"
T0=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/device_out}"
mkdir -p "$OUT" /tmp/site /tmp/devdata
if ! python3 -c "import nibabel" 2>/dev/null && [ ! -d /tmp/site/nibabel ]; then
  tar xJf .device_site/site.tar.xz -C /tmp/site
fi
# the image has no SimpleITK; training never calls it and, since 2026-12-04 (sixth session), voxreg.io
# imports it only where it is used (tests/test_startup.py); the stub stays as a guard, untested on a GPU yet
if ! python3 -c "import SimpleITK" 2>/dev/null && [ ! -d /tmp/site/SimpleITK ]; then
  mkdir -p /tmp/site/SimpleITK
  printf 'def __getattr__(name):\n    raise ImportError("SimpleITK is not installed here")\n' >/tmp/site/SimpleITK/__init__.py
  printf 'sitkComplexFloat32 = sitkComplexFloat64 = -1\n' >>/tmp/site/SimpleITK/__init__.py
fi
export PYTHONPATH="$ROOT/src:/tmp/site" PYTHONUNBUFFERED=1
[ -f /tmp/devdata/train.csv ] || tar xJf .device_data/data.tar.xz -C /tmp/devdata
VOXREG=(python3 -c "from voxreg.cli import app; app()")
FLAGS=(/tmp/devdata/train.csv --val /tmp/devdata/heldout.csv --half-res --fine-features 16 --int-steps 5
  --network vm2 --similarity ncc --lambda 0.5 --lr 1e-4 --batch-size "$BATCH" --device "${DEVICE:-cuda}"
  --init runs/brain-real-v2/weights.pt)
# heads in the bundle (pack_device_bundles.sh ... HEADS_DIR): pairs within a folder, brain-brain or head-head
grep -q "^heads/" /tmp/devdata/train.csv && FLAGS+=(--pairs-within-folders)
nvidia-smi -L 2>/dev/null || true
echo "[device] ready after $(( $(date +%s) - T0 )) s"
"${VOXREG[@]}" train "${FLAGS[@]}" --steps "${PROBE_STEPS:-60}" --seed 99 --checkpoint-every 1000 --validate-every 1000 \
  -o /tmp/probe >"$OUT/probe.log" 2>&1 || { tail -n 20 "$OUT/probe.log"; exit 1; }
SPS=$(python3 - <<'PY'
import csv
rows = list(csv.DictReader(open("/tmp/probe/metrics.csv")))
a, b = rows[9], rows[-1]   # leave the warm-up steps out
print((float(b["seconds"]) - float(a["seconds"])) / (int(b["step"]) - int(a["step"])))
PY
)
ELAPSED=$(( $(date +%s) - T0 ))
# start-up of the real run (~= the probe's own), validation every 500 steps, final save: 25 s margin
STEPS=$(python3 -c "print(max(100, int(($BUDGET - $ELAPSED - 25 - 15) / ($SPS * 1.08))))")
echo "[device] probe: $SPS s/step at batch $BATCH; training $STEPS steps (elapsed ${ELAPSED} s of $BUDGET)"
( while sleep 90; do [ -f /tmp/run/last.pt ] && cp /tmp/run/last.pt "$OUT/snap_$(date +%s).pt"; done ) &
SNAP=$!
"${VOXREG[@]}" train "${FLAGS[@]}" --steps "$STEPS" --lr-schedule cosine --seed 7 --checkpoint-every 500 \
  --validate-every 500 -o /tmp/run >"$OUT/train.log" 2>&1
RC=$?
kill $SNAP 2>/dev/null
cp /tmp/run/last.pt /tmp/run/metrics.csv "$OUT/" 2>/dev/null
# keep at most 4 snapshots (8 files come back)
ls "$OUT"/snap_*.pt 2>/dev/null | head -n -4 | xargs -r rm -f
tail -n 5 "$OUT/train.log"
echo "[device] rc $RC after $(( $(date +%s) - T0 )) s"
