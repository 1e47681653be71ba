#!/usr/bin/env bash
# Install (into .venv) and run the whole test suite offline on the CPU, then the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check .
python -m pytest -q "$@"
