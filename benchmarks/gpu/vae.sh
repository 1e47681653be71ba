#!/usr/bin/env bash
# Issue 8's GPU use, for one lent H100/H200 call: continue training the embedded VAE (crispdiff/assets/vae-noto-f4)
# on the full Noto emoji set with its model card's recipe (decoder noise 0.6, spectral weight 40, the card's held-out
# split), optionally widened to more latent channels, then measure held-out reconstruction against the committed VAE
# (bench_vae.py: PSNR, SSIM, hf and Laplacian ratios per held-out set). The trained vae/ folder comes back in $OUT,
# so the weights a GPU bought are not lost with the machine.
#
#   here, once:      bash benchmarks/gpu/fetch_wheels.sh
#                    mkdir -p benchmarks/gpu/shared/data && cp -r ../shared/data/noto-emoji-64 benchmarks/gpu/shared/data/
#   on the device:   bash benchmarks/gpu/vae.sh   (carry benchmarks/gpu/wheels and benchmarks/gpu/shared)
#   on a CPU:        GPU_BENCH_TINY=1 bash benchmarks/gpu/vae.sh   (a few steps, same code path)
#
# Environment: GPU_VAE_LATENT_CHANNELS (8 = the committed width; 16 widens function-preservingly), GPU_VAE_STEPS
# (4000), GPU_VAE_BATCH (64), GPU_VAE_TRAIN_SECONDS (360), GPU_BENCH_BUDGET (seconds for all stages, 540),
# CRISPDIFF_SHARED (the folder holding data/noto-emoji-64; default benchmarks/gpu/shared, else ../shared),
# GPU_BENCH_WORK, PYTHON. A training stage cut by its timeout is finished from its last checkpoint (every 250 steps).
set -uo pipefail

# shellcheck source=benchmarks/gpu/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
init_run vae || exit 1
use_shared
DATA=$CRISPDIFF_SHARED/data/noto-emoji-64/train
LATENT=${GPU_VAE_LATENT_CHANNELS:-8}
if [ "$TINY" = 1 ]; then
    STEPS=${GPU_VAE_STEPS:-4}; BATCH=${GPU_VAE_BATCH:-4}; PREC=no; TRAIN_SECONDS=${GPU_VAE_TRAIN_SECONDS:-300}
    EVERY=2; RECORD=--no_record; MEASURE_SECONDS=600; BUDGET=${GPU_BENCH_BUDGET:-1200}  # CPU: measuring is slow
else
    STEPS=${GPU_VAE_STEPS:-4000}; BATCH=${GPU_VAE_BATCH:-64}; PREC=bf16; TRAIN_SECONDS=${GPU_VAE_TRAIN_SECONDS:-360}
    EVERY=250; RECORD=; MEASURE_SECONDS=120
fi

setup_device "crispdiff GPU VAE run" || exit 1
if [ ! -f "$DATA/metadata.jsonl" ]; then
    echo "no Noto emoji at $DATA: copy ../shared/data/noto-emoji-64 into benchmarks/gpu/shared/data/ and carry it"
    exit 1
fi
RESULTS_LINES=$(wc -l <benchmarks/RESULTS.md 2>/dev/null || echo 0)

# ---- train: the card's decoder-noise recipe, all of the VAE, on the card's training split -------------------------
VAE_ARGS=(--train_data_dir "$DATA" --resolution 64 --pretrained_vae_name_or_path crispdiff/assets/vae-noto-f4
    --latent_channels "$LATENT" --decoder_noise 0.6 --recon_loss l1 --kl_weight 1e-6 --spectral_weight 40
    --train_batch_size "$BATCH" --mixed_precision "$PREC" --learning_rate 2e-4 --lr_scheduler constant_with_warmup
    --lr_warmup_steps 50 --validation_steps "$EVERY" --checkpointing_steps "$EVERY" --validation_fraction 0.05
    --seed 0 --holdout_column category --holdout_values Activities "Food & Drink" --output_dir "$WORK/vae-run")
echo "training: ${STEPS} steps of ${BATCH}, ${LATENT} latent channels, precision ${PREC}, data ${DATA}"
run_stage vae_train "$TRAIN_SECONDS" "$PY" train_scripts/train_vae.py "${VAE_ARGS[@]}" --max_train_steps "$STEPS"
if [ ! -f "$WORK/vae-run/vae/config.json" ]; then
    # Cut short: the last checkpoint becomes the result (resume exactly, stop at once, export).
    LAST=$(find "$WORK/vae-run" -maxdepth 1 -name 'checkpoint-*' -printf '%f\n' | sed 's/checkpoint-//' | sort -n | tail -1)
    if [ -n "$LAST" ]; then
        run_stage vae_finish 120 "$PY" train_scripts/train_vae.py "${VAE_ARGS[@]}" --max_train_steps "$LAST" \
            --resume_from_checkpoint latest
    else
        echo "[vae_finish] skipped: no checkpoint was written"
    fi
fi

# ---- measure: held-out reconstruction, committed VAE vs this run ---------------------------------------------------
if [ -f "$WORK/vae-run/vae/config.json" ]; then
    # shellcheck disable=SC2086
    run_stage vae_measure "$MEASURE_SECONDS" "$PY" benchmarks/bench_vae.py --vae committed=embedded \
        "gpu=$WORK/vae-run/vae" $RECORD
    # the table: printed with --no_record, else appended to this copy of RESULTS.md
    { grep -E '^\|' "$WORK/vae_measure.log"; tail -n +"$(( RESULTS_LINES + 1 ))" benchmarks/RESULTS.md | grep -E '^\|'; } \
        >"$WORK/summary.md"
    [ -s "$WORK/summary.md" ] || echo "no table (see vae_measure.log)" >"$WORK/summary.md"
else
    echo "no VAE was trained (see vae_train.log)" >"$WORK/summary.md"
fi

# ---- files for the caller -----------------------------------------------------------------------------------------
if [ -n "${OUT:-}" ]; then
    copy_common_outputs vae_train vae_finish vae_measure
    mkdir -p "$OUT/vae"
    cp "$WORK"/vae-run/vae/*.json "$WORK"/vae-run/vae/*.safetensors "$OUT/vae/" 2>/dev/null
fi
echo
echo "== done in $(elapsed)s; outputs in $WORK${OUT:+ and $OUT}"
cat "$WORK/summary.md"
