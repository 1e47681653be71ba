#!/usr/bin/env bash
# Issue 34's compute ladder on a GPU, for one lent H100/H200 call: README's main job (train_latent.py on the Noto
# emoji embedded in crispdiff) with --time_budget_minutes M for each M in GPU_LADDER_MINUTES, so the budget picks the
# UNet rung and the step count on this card exactly as it does on a CPU; then each saved pipeline's quality row from
# benchmarks/quality.py, the measure of the CPU ladder (held-out SWD / floor, sharpness, subcategory top-1, precision
# / recall in the classifier's feature space, distance to the training images), so GPU and CPU points sit side by
# side. One short table at the end.
#
#   here, once:    bash benchmarks/gpu/fetch_wheels.sh
#                  mkdir -p benchmarks/gpu/shared/data benchmarks/gpu/shared/bench-cache
#                  cp -r ../shared/data/noto-emoji-64 benchmarks/gpu/shared/data/
#                  cp ~/.cache/crispdiff/bench/classifier-noto-*.safetensors benchmarks/gpu/shared/bench-cache/
#   on the device: bash benchmarks/gpu/ladder.sh   (carry benchmarks/gpu/wheels and benchmarks/gpu/shared)
#   on a CPU:      GPU_BENCH_TINY=1 bash benchmarks/gpu/ladder.sh   (one short budget, few samples, same code path)
#
# Environment: GPU_LADDER_MINUTES (the budgets, "1 3"), GPU_BENCH_BUDGET (seconds for all stages, 570),
# CRISPDIFF_SHARED (the folder holding data/noto-emoji-64; default benchmarks/gpu/shared, else ../shared),
# GPU_BENCH_WORK, PYTHON. The classifier carried in bench-cache is the one the CPU ladder was measured with; without
# it the device trains its own (a minute), whose top-1 is close to but not the same measure.
set -uo pipefail

# shellcheck source=benchmarks/gpu/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
init_run ladder || exit 1
use_shared
if [ "$TINY" = 1 ]; then
    MINUTES=${GPU_LADDER_MINUTES:-1}; PREC=no; QUALITY_ARGS="--num_images 32 --per_class 1"; MEASURE_SECONDS=600
    START_SECONDS=300; BUDGET=${GPU_BENCH_BUDGET:-1200}  # a CPU starts and samples slowly
else
    MINUTES=${GPU_LADDER_MINUTES:-1 3}; PREC=bf16; QUALITY_ARGS=""; MEASURE_SECONDS=150; START_SECONDS=90
    BUDGET=${GPU_BENCH_BUDGET:-570}
fi
RECORD=--no_record  # the table is the record: summary.md carries date, machine and command

setup_device "crispdiff GPU compute ladder" || exit 1
if [ ! -f "$CRISPDIFF_SHARED/data/noto-emoji-64/train/metadata.jsonl" ]; then
    echo "no Noto emoji under $CRISPDIFF_SHARED/data: copy ../shared/data/noto-emoji-64 into benchmarks/gpu/shared/data/"
    echo "and carry it (the held-out images and the classifier's training images come from there)"
    exit 1
fi
CACHE=$HOME/.cache/crispdiff/bench
if ls "$REPO"/benchmarks/gpu/shared/bench-cache/classifier-noto-*.safetensors >/dev/null 2>&1; then
    mkdir -p "$CACHE" && cp "$REPO"/benchmarks/gpu/shared/bench-cache/classifier-noto-*.safetensors "$CACHE/"
    echo "classifier: the carried one (the CPU ladder's)"
elif ls "$CACHE"/classifier-noto-*.safetensors >/dev/null 2>&1; then
    echo "classifier: the one in $CACHE"
else
    echo "classifier: none carried; quality.py trains one here (top-1 then differs slightly from the CPU ladder's)"
fi

STAGES=()
for minutes in $MINUTES; do
    name=train-${minutes}min
    run_dir=$WORK/ladder-${minutes}min
    STAGES+=("$name" "quality-${minutes}min")
    # the budget ends the run, export included; START_SECONDS is for process start and imports (and a tiny run's
    # fewest steps, which a CPU may take longer than the budget for)
    run_stage "$name" "$(awk -v m="$minutes" -v s="$START_SECONDS" 'BEGIN { printf "%d", m * 60 + s }')" \
        "$PY" train_scripts/train_latent.py \
        --time_budget_minutes "$minutes" --mixed_precision "$PREC" --seed 0 --output_dir "$run_dir"
    if [ -f "$run_dir/pipeline/model_index.json" ]; then
        # shellcheck disable=SC2086
        run_stage "quality-${minutes}min" "$MEASURE_SECONDS" "$PY" benchmarks/quality.py "$run_dir/pipeline" \
            --family noto --seed 0 $QUALITY_ARGS
    else
        echo "[quality-${minutes}min] skipped: no pipeline (see $name.log)"
    fi
done

# ---- the one table ------------------------------------------------------------------------------------------------
"$PY" - "$WORK" "$PREC" "$QUALITY_ARGS" $MINUTES >"$WORK/summary.md" <<'EOF'
import datetime, json, platform, sys
from pathlib import Path
import torch
work, precision, quality_args, budgets = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {platform.machine()}"
print(f"- date: {datetime.date.today()}; machine: {device} (torch {torch.__version__})")
print(f"- command: `GPU_LADDER_MINUTES='{' '.join(budgets)}' bash benchmarks/gpu/ladder.sh`: README's main job with "
      f"`--time_budget_minutes M --mixed_precision {precision} --seed 0`, then `benchmarks/quality.py PIPELINE "
      f"--family noto{' ' + quality_args if quality_args else ''}` (DPM-Solver++ 25, against held-out Noto emoji)")
print()
print("| budget (wall min) | UNet | steps of batch | SWD / floor | hf | Laplacian | top-1 (every class alike) "
      "| top-1 (held-out mix) | precision / recall | copy distance | near-copies |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for minutes in budgets:
    run = work / f"ladder-{minutes}min"
    try:
        config = json.loads((run / "pipeline" / "crispdiff_training.json").read_text())
        model = (f"base {config['base_channels']} x {config['channel_mults']}, "
                 f"{config['layers_per_block']} layer(s)")
        steps = f"{config['max_train_steps']} of {config['train_batch_size']}"
    except (OSError, ValueError, KeyError):
        model, steps = "(no pipeline)", "-"
    try:
        log = (work / f"quality-{minutes}min.log").read_text().splitlines()
        row = json.loads(next(line for line in reversed(log) if line.startswith("{")))
    except (OSError, StopIteration, ValueError):
        print(f"| {minutes} | {model} | {steps} | not measured (quality-{minutes}min.log) | | | | | | | |")
        continue
    print(f"| {minutes} | {model} | {steps} | {row['swd_ratio']:.2f}x | {row['hf']:.2f} | {row['laplacian']:.2f} | "
          f"{row.get('top1', float('nan')):.3f} | {row.get('top1_mix', float('nan')):.3f} | "
          f"{row['precision']:.2f} / {row['recall']:.2f} | {row['copy_distance']:.2f} | {row['near_copies']:.1%} |")
print()
print("Real images (the CPU ladder's floor rows, benchmarks/RESULTS.md): top-1 0.338 every class alike, 0.768 in the "
      "held-out mix; precision / recall 0.91 / 0.95; copy distance 1.0.")
EOF

# ---- files for the caller -----------------------------------------------------------------------------------------
if [ -n "${OUT:-}" ]; then
    copy_common_outputs "${STAGES[@]}"
    for minutes in $MINUTES; do
        grid=$WORK/ladder-${minutes}min/pipeline/samples.png
        [ -f "$grid" ] && cp "$grid" "$OUT/ladder-gpu-${minutes}min-samples.png"
    done
fi
echo
echo "== done in $(elapsed)s; outputs in $WORK${OUT:+ and $OUT}"
cat "$WORK/summary.md"
