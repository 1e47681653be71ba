#!/usr/bin/env bash
# Create .venv (if missing) and install crispdiff with its test extras into it. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[test]"
python -c "import crispdiff, diffusers, torch; print(f'crispdiff {crispdiff.__version__}, diffusers {diffusers.__version__}, torch {torch.__version__}')"
