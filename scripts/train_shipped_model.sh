#!/usr/bin/env bash
# Train (or continue) the brain model that ships inside voxreg: run brain-real-v2, unsupervised
# scan-to-scan pairs (NCC + lambda |grad v|^2, diffeomorphic) of OpenNeuro ds002748 (CC0),
# prepared by scripts/prepare_ds002748.py (sub-65..72 held out). Never on ../shared/data.
#   bash scripts/train_shipped_model.sh             train: resumes runs/brain-real-v2/work/last.pt exactly
#                                                    when present, else starts from the committed
#                                                    weights runs/brain-real-v2/weights.pt, else from the
#                                                    synthetic-data model brain-synth-v1 (widened by the
#                                                    full-resolution branch, --fine-features 16)
#   bash scripts/train_shipped_model.sh --handover  before a session ends: write weights.pt (weights only,
#                                                    committed) and metrics.csv.gz (gzip: the whole run, earlier
#                                                    segments' rows, then this one's with steps and
#                                                    seconds offset to follow them)
# DATA is the output folder of prepare_ds002748.py; never committed.
# work/ (full checkpoints with optimiser state) is not committed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
RUN="$ROOT/runs/brain-real-v2"
WORK="$RUN/work"
# since the thirteenth session the similarity is scored at 1.035 mm (--similarity-scale 2): DATA is
# prepare_ds002748.py's output with --voxel-mm 1.035 --crop 160x192x160
DATA="${VOXREG_TRAIN_DATA:-/work/data/ds002748_fine}"
mkdir -p "$WORK"
if [ "${1:-}" = "--handover" ]; then
  "$VENV_PY" -c "import sys; from voxreg.nn.checkpoint import save_weights_only; save_weights_only(sys.argv[1], sys.argv[2])" \
    "$WORK/last.pt" "$RUN/weights.pt"
  # the run's whole history: the rows committed before this segment (a segment continued with
  # --init counts its steps and seconds from 0 again) and this segment's, offset to follow them
  # (gzip-compressed: the committed history stays small as the run grows)
  "$VENV_PY" - "$WORK/previous_metrics.csv.gz" "$WORK/metrics.csv" "$RUN/metrics.csv.gz" <<'PY'
import csv, gzip, os, sys
previous, work, out = sys.argv[1:]
rows = list(csv.DictReader(gzip.open(previous, "rt", newline=""))) if os.path.exists(previous) else []
step0, seconds0 = (int(rows[-1]["step"]), float(rows[-1]["seconds"])) if rows else (0, 0.0)
with open(work, newline="") as handle:
    reader = csv.DictReader(handle)
    fields = reader.fieldnames
    for row in reader:
        row["step"], row["seconds"] = str(int(row["step"]) + step0), str(float(row["seconds"]) + seconds0)
        rows.append(row)
with gzip.open(out, "wt", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
print(f"{out}: {len(rows)} rows, steps {step0} + this segment's")
PY
  [ -f "$WORK/loss_curve.png" ] && cp "$WORK/loss_curve.png" "$RUN/loss_curve.png"
  exit 0
fi
if [ -f "$WORK/last.pt" ]; then
  START=(--resume)
elif [ -f "$RUN/weights.pt" ]; then
  START=(--init "$RUN/weights.pt")
  # a new segment: its steps count from 0; --handover appends them after these rows
  [ -f "$RUN/metrics.csv.gz" ] && cp "$RUN/metrics.csv.gz" "$WORK/previous_metrics.csv.gz"
else
  START=(--init brain)   # the shipped model (synthetic-data brain-synth-v1 step 13,387 before this run shipped)
fi
exec "$(dirname "$VENV_PY")/voxreg" train "$DATA/train.csv" --val "$DATA/heldout.csv" \
    --half-res --fine-features 16 --int-steps 5 --network vm2 --similarity ncc --lambda 1 --lr 1e-4 --similarity-scale 2 \
    --steps 100000 --checkpoint-every 50 --validate-every 250 --seed 0 --device auto \
    -o "$WORK" "${START[@]}" "$@"
