#!/usr/bin/env bash
# Train (or continue) the brain model that will ship inside voxreg, on licence-clean synthetic
# data only (MNI152 of the nilearn wheel + random shapes). Never on ../shared/data.
#   bash scripts/train_shipped_model.sh             train: resumes runs/brain-synth-v1/work/last.pt exactly
#                                                    when present, else starts from the committed
#                                                    weights runs/brain-synth-v1/weights.pt (--init), else fresh
#   bash scripts/train_shipped_model.sh --handover  before a session ends: write weights.pt (weights only,
#                                                    ~1.2 MB, committed) and a copy of metrics.csv
# work/ (full checkpoints with optimiser state, >2 MiB) is not committed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
RUN="$ROOT/runs/brain-synth-v1"
WORK="$RUN/work"
mkdir -p "$WORK"
if [ "${1:-}" = "--handover" ]; then
  "$VENV_PY" -c "import sys; from voxreg.nn.checkpoint import save_weights_only; save_weights_only(sys.argv[1], sys.argv[2])" \
    "$WORK/last.pt" "$RUN/weights.pt"
  cp "$WORK/metrics.csv" "$RUN/metrics.csv"   # all steps so far (the run's CSV carries on across resumes)
  exit 0
fi
START=(--schedule 0.5:3000)
if [ -f "$WORK/last.pt" ]; then
  START=(--resume --schedule 0.5:3000)
elif [ -f "$RUN/weights.pt" ]; then
  START=(--init "$RUN/weights.pt")   # continues the committed weights (fresh Adam state, full resolution)
fi
# 80x96x80 synthetic grid: the MNI brain fills it at ~2.07 mm per voxel (the model's space).
exec "$(dirname "$VENV_PY")/voxreg" train --synth brain:0.8,shapes:0.2 --synth-shape 80x96x80 --voxel-size 2.07 \
    --dice-weight 1 --similarity ncc --similarity-weight 1 --network vm2 --half-res --int-steps 5 \
    --lambda 1 --lr 1e-4 --steps 200000 --checkpoint-every 100 --seed 0 --device auto \
    -o "$WORK" "${START[@]}" "$@"
