#!/usr/bin/env bash
# The main job on a fresh machine: install, then train a latent diffusion model on the embedded emoji with the
# embedded VAE. Ends with crispdiff-latent/pipeline (a diffusers pipeline) and crispdiff-latent/pipeline/samples.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
accelerate launch train_scripts/train_latent.py "$@"
