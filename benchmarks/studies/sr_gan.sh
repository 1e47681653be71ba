#!/usr/bin/env bash
# The 128 px study (issue 36): GAN fine-tunes of the embedded SR x2, measured on the main job's own samples.
#
#   bash benchmarks/studies/sr_gan.sh unpaired      # 400 unpaired 64 px samples of a Noto model not measured below
#   bash benchmarks/studies/sr_gan.sh train NAME [train_sr.py flags]   # one candidate (e.g. --gan_weight 0.1)
#       from INIT (default: embedded, itself the blend this study chose; the pixel-loss model of the embedded card's
#       stage 1 reproduces the study)
#   bash benchmarks/studies/sr_gan.sh measure PIPELINE FAMILY SEED NAME...  # bench_sr.py generated with each SR
#
# Paths: OUT (default benchmarks/out/sr36), SPLITS (benchmarks/out/own-data-splits, written by own_data.py),
# UNPAIRED_FROM (a pipeline folder whose samples are the unpaired inputs; never one of the measured pipelines).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/out/sr36}
SPLITS=${SPLITS:-benchmarks/out/own-data-splits}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
case "$1" in
unpaired)
    python - "${UNPAIRED_FROM:?a pipeline folder}" "$OUT" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, "benchmarks")
from bench_sr import sample_raw

raw, _ = sample_raw(Path(sys.argv[1]), 400, 50, 7, Path(sys.argv[2]) / "unpaired.pt")
folder = Path(sys.argv[2]) / "unpaired-64"
folder.mkdir(parents=True, exist_ok=True)
for i, image in enumerate(raw):
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(array)).save(folder / f"{i:05d}.png")
PY
    ;;
train)
    name=$2; shift 2
    python train_scripts/train_sr.py --train_data_dir "$SPLITS/noto-128/sr_train" --output_dir "$OUT/$name" \
        --init_sr_model_name_or_path "${INIT:-embedded}" --vae_roundtrip_prob 0.5 --vae_latent_noise 0.3 --input_blur_max 0.5 \
        --unpaired_data_dir "$OUT/unpaired-64" --train_batch_size 16 --learning_rate 5e-4 --lr_warmup_steps 50 \
        --checkpointing_steps 200 --validation_steps 200 "$@"
    ;;
measure)
    pipeline=$2; family=$3; seed=$4; shift 4
    models=("today=embedded")
    for name in "$@"; do models+=("$name=$OUT/$name/sr_model"); done
    python benchmarks/bench_sr.py --threads 2 generated --pipeline "$pipeline" --family "$family" --seed "$seed" \
        --splits "$SPLITS" --samples_cache "$OUT/samples-$(basename "$(dirname "$pipeline")")-s$seed.pt" \
        --sr_models "${models[@]}" --grid "$OUT/grid-$(basename "$(dirname "$pipeline")")-s$seed.png"
    ;;
*)
    echo "usage: sr_gan.sh unpaired | train NAME [flags] | measure PIPELINE FAMILY SEED NAME..." >&2
    exit 2
    ;;
esac
