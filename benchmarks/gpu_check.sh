#!/usr/bin/env bash
# Prepared GPU check (one NVIDIA GPU, e.g. H200), run from the repository root:
#     bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --budget 170]
# 1. creates or reuses .venv (scripts/setup_env.sh); if that cannot install (no network),
#    falls back to an existing .venv / python that imports voxreg and torch;
# 2. checks that torch is a CUDA build. The GPU machine has no network, so a CPU-only torch
#    cannot be swapped there: it prints 'torch has no CUDA on this machine: <version>' and
#    still runs the CPU parts. (With network, a CUDA build of the pinned torch is
#    `pip install --force-reinstall torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128`;
#    set VOXREG_TRY_CUDA_TORCH=1 to let this script try it.)
# 3. runs benchmarks/gpu_check.py: CUDA tests, network / instance / training timings, one
#    markdown table, also written to $OUT/gpu_check.md when $OUT is set. Under 3 minutes on
#    an H200 (overall budget 170 s for the parts, each with its own timeout).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
T0=$(date +%s)
PY=""
if ( source scripts/setup_env.sh >/tmp/voxreg_gpu_check_setup.log 2>&1 ); then
  PY="$ROOT/.venv/bin/python"
else
  echo "[gpu_check] scripts/setup_env.sh failed: $(tail -n 1 /tmp/voxreg_gpu_check_setup.log)"
  for cand in "$ROOT/.venv/bin/python" python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
  if [ -z "$PY" ]; then echo "[gpu_check] FAILED: no python with torch on this machine"; exit 2; fi
  if ! "$PY" -c "import voxreg" >/dev/null 2>&1; then export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"; fi
  echo "[gpu_check] using $PY"
fi
echo "[gpu_check] environment ready in $(( $(date +%s) - T0 )) s"
if [ "$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" != "True" ]; then
  if [ "${VOXREG_TRY_CUDA_TORCH:-0}" = 1 ]; then
    echo "[gpu_check] trying a CUDA build of torch==2.13.0 (needs network)"
    timeout 600 "$PY" -m pip install -q --force-reinstall torch==2.13.0 \
      --index-url https://download.pytorch.org/whl/cu128 || echo "[gpu_check] CUDA torch install failed"
  fi
  if [ "$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" != "True" ]; then
    echo "torch has no CUDA on this machine: $("$PY" -c 'import torch; print(torch.__version__)')"
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | head -n 2
  fi
fi
exec "$PY" benchmarks/gpu_check.py "$@"
