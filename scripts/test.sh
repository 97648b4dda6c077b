#!/usr/bin/env bash
# Run voxreg's test suite (creates/reuses .venv). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# Best effort: headless Chromium + chromedriver (Debian packages) for the HTML report test;
# never fails the run (the test skips without them).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then
  echo "[voxreg] installing chromium and chromium-driver (apt-get) for the HTML report test"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
    >/dev/null 2>&1 || echo "chromium not installed: the HTML report test will skip"
fi
exec "$VENV_PY" -m pytest -q "$@"
