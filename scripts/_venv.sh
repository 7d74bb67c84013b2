# Sourced by scripts/run and scripts/test: make .venv (Python >= 3.11) if needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "creating .venv with $candidate" >&2
      "$candidate" -m venv .venv
      .venv/bin/python -m pip install --quiet --upgrade pip
      break
    fi
  done
  [ -x .venv/bin/python ] || { echo "error: Python 3.11 or newer is needed (set PYTHON=...)" >&2; exit 1; }
fi
