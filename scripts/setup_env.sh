#!/usr/bin/env bash
# Create or reuse .venv and install voxreg with its test tools (idempotent).
# Usage: source scripts/setup_env.sh   (sets VENV_PY)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "[voxreg] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.voxreg-installed"
HASH="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  echo "[voxreg] installing voxreg and dependencies into .venv (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test,lint]" 2>&1 | grep -v "is ignored: it is neither" || true
  "$VENV/bin/python" -c "import voxreg, torch" || { echo "[voxreg] installation failed"; exit 1; }
  echo "$HASH" > "$STAMP"
fi
VENV_PY="$VENV/bin/python"
export VENV_PY
