#!/usr/bin/env bash
# Run the voxreg demo on the MNI152 template shipped in the nilearn wheel (no external data).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/voxreg" demo "$@"
