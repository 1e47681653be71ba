#!/usr/bin/env bash
# crispdiff's GPU benchmark, for one lent H100/H200 call (at most 10 minutes; this script aims at ~9 at most):
#   (a) training throughput, crispdiff vs the diffusers-style loop (bench_throughput.py, bf16, batch 128);
#   (b) the seed recipe (cosine, v-prediction, min-SNR 5, EMA) trained for ~160 s worth of steps, evaluated with
#       DPM-Solver++ 25 against the real-vs-real floor (bench_samplers.py);
#   (c) the sampler sweep on that model (DPM-Solver++ 10/25/50, DDIM 50, UniPC 25, DDPM 1000);
# then ONE short table. 64 px, the Noto emoji subset embedded in crispdiff (the device gets only the working tree).
#
#   on the device:  bash benchmarks/gpu/run.sh            (carry benchmarks/gpu/wheels; see benchmarks/gpu/README.md)
#   on a CPU:       GPU_BENCH_TINY=1 bash benchmarks/gpu/run.sh   (tiny model, same code path, a few minutes)
#
# Environment: GPU_BENCH_TINY=1, GPU_BENCH_DATA (image folder), GPU_BENCH_TRAIN_STEPS (else sized from (a)),
# GPU_BENCH_TRAIN_SECONDS (160), GPU_BENCH_BUDGET (seconds for all stages, 540), GPU_BENCH_WORK (scratch folder),
# PYTHON (python3). Files for the caller go to $OUT when it is set. Every stage has its own timeout, cut to what is
# left of the budget, so one stall cannot eat the call; a failed stage is reported and the next one still runs.
set -uo pipefail

# shellcheck source=benchmarks/gpu/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
init_run bench || exit 1
DATA=${GPU_BENCH_DATA:-$REPO/crispdiff/assets/noto-emoji-64}
export MPLBACKEND=Agg

if [ "$TINY" = 1 ]; then
    RES=32; BASE=16; MULTS="1 2"; ATTN="16"; LAYERS=1; BATCH=8; PREC=no
    TP_ARGS="--steps 1 --repeats 1 --warmup 1"
    DEFAULT_STEPS=20; NUM_IMAGES=16; SAMPLE_BATCH=16; SAMPLE_DTYPE=fp32; RECORD=--no_record
else
    RES=64; BASE=64; MULTS="1 2 3 4"; ATTN="16 8"; LAYERS=2; BATCH=128; PREC=bf16
    TP_ARGS="--steps 10 --repeats 3 --warmup 3"
    DEFAULT_STEPS=3000; NUM_IMAGES=500; SAMPLE_BATCH=500; SAMPLE_DTYPE=fp32; RECORD=
fi
SWEEP=${GPU_BENCH_SWEEP:-dpmsolver++:10,dpmsolver++:25,dpmsolver++:50,ddim:50,unipc:25,ddpm:1000}
TRAIN_SECONDS=${GPU_BENCH_TRAIN_SECONDS:-160}
ARCH="--resolution $RES --base_channels $BASE --channel_mults $MULTS --attention_res $ATTN --layers_per_block $LAYERS"

setup_device "crispdiff GPU benchmark" || exit 1
RESULTS_LINES=$(wc -l <benchmarks/RESULTS.md 2>/dev/null || echo 0)

# ---- (a) throughput ---------------------------------------------------------------------------------------------
if "$PY" -c "import datasets" 2>/dev/null; then
    # shellcheck disable=SC2086
    run_stage throughput 120 "$PY" benchmarks/bench_throughput.py --data_dir "$DATA" $ARCH \
        --train_batch_size "$BATCH" --mixed_precision "$PREC" $TP_ARGS $RECORD
else
    echo "[throughput] skipped: the diffusers-style baseline needs datasets"
fi

# ---- (b) train the seed recipe, evaluate DPM-Solver++ 25 ----------------------------------------------------------
STEPS=${GPU_BENCH_TRAIN_STEPS:-}
if [ -z "$STEPS" ]; then
    # Size the run from (a)'s measured crispdiff img/s so that training takes ~TRAIN_SECONDS on this card.
    STEPS=$("$PY" - "$WORK/throughput.log" "$TRAIN_SECONDS" "$BATCH" "$DEFAULT_STEPS" "$TINY" <<'EOF'
import re, sys
log, seconds, batch, default, tiny = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
try:
    row = next(line for line in open(log) if line.startswith("| crispdiff"))
    ips = float(row.split("|")[2])
    steps = int(seconds * ips / batch) // 100 * 100
    print(default if tiny == "1" else max(300, min(steps, 20000)))
except (OSError, StopIteration, ValueError, IndexError):
    print(default)
EOF
)
fi
echo "training steps: $STEPS (batch $BATCH)"
# shellcheck disable=SC2086
run_stage train $(( TRAIN_SECONDS + 120 )) "$PY" benchmarks/bench_samplers.py --data_dir "$DATA" $ARCH \
    --train_batch_size "$BATCH" --mixed_precision "$PREC" --train_steps "$STEPS" --samplers dpmsolver++:25 \
    --num_images "$NUM_IMAGES" --sample_batch_size "$SAMPLE_BATCH" --sample_dtype "$SAMPLE_DTYPE" \
    --out_dir "$WORK/train" $RECORD

# ---- (c) the sampler sweep on that model --------------------------------------------------------------------------
if [ -f "$WORK/train/model/pipeline/model_index.json" ]; then
    # shellcheck disable=SC2086
    run_stage sweep 200 "$PY" benchmarks/bench_samplers.py --pipeline "$WORK/train/model/pipeline" \
        --data_dir "$DATA" --samplers "$SWEEP" --num_images "$NUM_IMAGES" --sample_batch_size "$SAMPLE_BATCH" \
        --sample_dtype "$SAMPLE_DTYPE" --out_dir "$WORK/sweep" $RECORD
else
    echo "[sweep] skipped: stage (b) left no pipeline"
fi

# ---- the one table ------------------------------------------------------------------------------------------------
"$PY" - "$WORK" "$STEPS" "$BATCH" "$PREC" "$RES" "$DATA" "$SWEEP" >"$WORK/summary.md" <<'EOF'
import json, sys
from pathlib import Path
work, steps, batch, prec, res, data = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
planned = len([item for item in sys.argv[7].split(",") if item.strip()])
sys.path.insert(0, "benchmarks")
from plots import sampler_label  # noqa: E402

def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

lines = []
try:
    rows = {r.split("|")[1].strip(): r.split("|") for r in open(work / "throughput.log") if r.startswith("| ")}
    ours, base = rows["crispdiff Trainer.optimizer_step"], rows["diffusers-style baseline"]
    lines.append(f"throughput ({prec}, batch {batch}, {res} px): crispdiff {float(ours[2]):.0f} img/s vs "
                 f"diffusers-style {float(base[2]):.0f} img/s = {float(ours[3]):.2f}x")
except (OSError, KeyError, IndexError, ValueError):
    lines.append("throughput: not measured (see throughput.log)")
sweep, train = load(work / "sweep" / "samplers.json"), load(work / "train" / "samplers.json")
if train and train.get("training_seconds"):
    lines.append(f"training: {train['model']}; {steps} steps in {train['training_seconds']:.0f} s "
                 f"({train['training_images_per_second']:.0f} img/s incl. data load + export) on {data}")
result = sweep if sweep and sweep.get("rows") else train
if result:
    lines.append(f"quality: {result['num_images']} samples vs {result['num_images']} real images; {result['machine']}")
    lines.append("")
    lines.append("| sampler | SWD x1e3 | HF ratio | LapVar ratio | colour-blob | ms/img |")
    lines.append("|---|---|---|---|---|---|")
    for r in result["rows"]:
        lines.append(f"| {sampler_label(r['sampler'], r['steps'])} | {r['swd_avg']:.2f} | {r['hf_energy_ratio']:.3f} | "
                     f"{r['laplacian_var_ratio']:.3f} | {r['colour_blob']:.3f} | {r['ms_per_image']:.3g} |")
    if result is not sweep or len(result["rows"]) < planned:
        lines.append(f"| (sweep incomplete: {len(result['rows'])} of {planned} samplers; see sweep.log) | | | | | |")
    f = result["floor"]
    lines.append(f"| real vs real (floor) | {f['swd_avg']:.2f} | {f['hf_energy_ratio']:.3f} | "
                 f"{f['laplacian_var_ratio']:.3f} | {f['colour_blob']:.3f} | - |")
else:
    lines.append("quality: no model was evaluated (see train.log / sweep.log)")
print("\n".join(lines))
EOF

# ---- files for the caller -----------------------------------------------------------------------------------------
if [ -n "${OUT:-}" ]; then
    copy_common_outputs throughput train sweep
    for pair in sweep/samplers.png:samplers.png sweep/grids.png:sampler-grids.png sweep/samplers.json:samplers.json \
                train/model/pipeline/samples.png:train-samples.png; do
        [ -f "$WORK/${pair%%:*}" ] && cp "$WORK/${pair%%:*}" "$OUT/${pair##*:}"
    done
fi
echo
echo "== done in $(elapsed)s; outputs in $WORK${OUT:+ and $OUT}"
cat "$WORK/summary.md"
