#!/usr/bin/env bash
# Train (or resume) the brain model that will ship inside voxreg, on licence-clean synthetic
# data only (MNI152 parcellation of the nilearn wheel + random shapes). Never on ../shared/data.
# The run lives in runs/brain-synth-v1 (last.pt is committed so the next session resumes it).
# Usage: bash scripts/train_shipped_model.sh [extra voxreg train options]   (log: runs/brain-synth-v1/train.log)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
RUN="$ROOT/runs/brain-synth-v1"
RESUME=()
[ -f "$RUN/last.pt" ] && RESUME=(--resume)
mkdir -p "$RUN"
# 80x96x80 synthetic grid: the MNI brain fills it at ~2.07 mm per voxel (the model's space).
exec "$(dirname "$VENV_PY")/voxreg" train --synth brain:0.8,shapes:0.2 --synth-shape 80x96x80 --voxel-size 2.07 \
    --dice-weight 1 --similarity ncc --similarity-weight 1 --network vm2 --half-res --int-steps 5 \
    --lambda 1 --lr 1e-4 --steps 200000 --schedule 0.5:3000 \
    --checkpoint-every 100 --seed 0 --device auto -o "$RUN" "${RESUME[@]}" "$@"
