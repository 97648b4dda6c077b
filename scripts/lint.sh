#!/usr/bin/env bash
# Lint: ruff (lint + format check), the import contracts (layers; no import cycles inside a package), mypy on core/ and registration/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
BIN="$(dirname "$VENV_PY")"
echo "[voxreg] ruff check";  "$BIN/ruff" check src tests benchmarks
echo "[voxreg] ruff format --check"; "$BIN/ruff" format --check src tests benchmarks
echo "[voxreg] import contracts (layers, no cycles within a package)"; (cd src && "$BIN/lint-imports" --no-cache ../pyproject.toml)
echo "[voxreg] mypy core registration"; "$BIN/mypy" src/voxreg/core src/voxreg/registration
