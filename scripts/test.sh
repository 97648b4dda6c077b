#!/usr/bin/env bash
# Run voxreg's test suite (creates/reuses .venv). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$VENV_PY" -m pytest -q "$@"
