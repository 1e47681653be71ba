# Shared by benchmarks/gpu/run.sh and vae.sh (sourced, not run): the common start, the stage runner and the device
# setup.
# shellcheck shell=bash

# init_run NAME: start the clock, go to the repository root and set what every stage uses: REPO, PY, TINY, BUDGET
# (GPU_BENCH_BUDGET, else 540 s), WORK (GPU_BENCH_WORK, else a fresh /tmp/crispdiff-gpu-NAME.*), WHEELS, SITE; offline,
# unbuffered, with the caches inside WORK.
init_run() {
    START=$(date +%s)
    cd "$(dirname "${BASH_SOURCE[0]}")/../.." || return 1
    REPO=$(pwd)
    PY=${PYTHON:-python3}
    TINY=${GPU_BENCH_TINY:-0}
    BUDGET=${GPU_BENCH_BUDGET:-540}
    WORK=${GPU_BENCH_WORK:-$(mktemp -d "/tmp/crispdiff-gpu-$1.XXXXXX")}
    WHEELS=$REPO/benchmarks/gpu/wheels
    SITE=$WORK/site
    mkdir -p "$WORK"
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
    export CRISPDIFF_CACHE=$WORK/cache HF_DATASETS_CACHE=$WORK/hf-datasets
}

elapsed() { echo $(( $(date +%s) - START )); }

# use_shared: export CRISPDIFF_SHARED, the folder holding data/noto-emoji-64: as given, else the carried
# benchmarks/gpu/shared, else ../shared beside the checkout.
use_shared() {
    if [ -z "${CRISPDIFF_SHARED:-}" ]; then
        CRISPDIFF_SHARED=$REPO/benchmarks/gpu/shared
        [ -d "$CRISPDIFF_SHARED/data/noto-emoji-64" ] || CRISPDIFF_SHARED=$REPO/../shared
    fi
    export CRISPDIFF_SHARED
}

# run_stage NAME SECONDS CMD...: run CMD with its output in $WORK/NAME.log, under a timeout of SECONDS or what is
# left of the budget (minus 20 s for the summary), whichever is less. Prints one status line (and the log's tail on
# failure); returns CMD's status (124 on timeout).
run_stage() {
    local name=$1 want=$2; shift 2
    local left=$(( BUDGET - $(elapsed) - 20 ))
    local limit=$(( want < left ? want : left ))
    if [ "$limit" -lt 15 ]; then
        echo "[$name] skipped: only ${left}s of the ${BUDGET}s budget left"
        return 125
    fi
    echo "[$name] start at $(elapsed)s (timeout ${limit}s)"
    local t0 status
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    status=$?
    if [ "$status" -eq 0 ]; then
        echo "[$name] ok in $(( $(date +%s) - t0 ))s"
    else
        echo "[$name] FAILED (status $status$([ "$status" -eq 124 ] && echo ', timed out')) after $(( $(date +%s) - t0 ))s; log tail:"
        tail -n 15 "$WORK/$name.log" | cut -c1-300
    fi
    return "$status"
}

# install_missing: the carried wheels into $SITE (a --target), then crispdiff itself; tiny mode on a machine that
# already imports both installs nothing.
install_missing() {
    if [ "$TINY" = 1 ] && "$PY" -c "import diffusers, crispdiff" 2>/dev/null; then
        echo "tiny mode: diffusers and crispdiff are importable here; nothing installed"
        return 0
    fi
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "no wheels in $WHEELS: run 'bash benchmarks/gpu/fetch_wheels.sh' on a machine with PyPI access and carry"
        echo "benchmarks/gpu/wheels to this one (benchmarks/gpu/README.md)"
        return 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || return 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PY" -c "import datasets" 2>"$WORK/datasets-import.log"; then
        # A datasets that cannot import (pyarrow older than it needs) would break accelerate's and transformers'
        # optional imports; without it only the diffusers-style baseline of stage (a) is lost.
        echo "datasets does not import here ($(tail -n 1 "$WORK/datasets-import.log" | cut -c1-160)); removed, so"
        echo "stage (a) is skipped (fetch with WITH_PYARROW=1 to carry a newer pyarrow)"
        rm -rf "$SITE"/datasets "$SITE"/datasets-*.dist-info
    fi
    local probe="import crispdiff.pipelines.pipeline_crispdiff"
    if ! "$PY" -c "$probe" 2>/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$REPO" >"$WORK/pip-crispdiff.log" 2>&1
        if ! "$PY" -c "$probe" 2>/dev/null; then
            # No usable setuptools: lay the package out as setuptools would (crispdiff.pipelines is pipelines/).
            echo "pip could not install crispdiff (see $WORK/pip-crispdiff.log); using a copy on PYTHONPATH"
            mkdir -p "$WORK/src"
            cp -r "$REPO/crispdiff" "$WORK/src/crispdiff"
            cp -r "$REPO/pipelines" "$WORK/src/crispdiff/pipelines"
            export PYTHONPATH="$WORK/src:$PYTHONPATH"
        fi
    fi
}

# setup_device TITLE: print what the machine has, install what it lacks, check that the imports work.
setup_device() {
    echo "== $1 (tiny=$TINY, work=$WORK)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    else
        echo "no nvidia-smi: running on $(nproc) CPU cores"
    fi
    install_missing || { echo "setup failed"; return 1; }
    "$PY" - <<'EOF' || { echo "setup failed: the imports above must work"; return 1; }
import importlib
import torch
versions = {name: getattr(importlib.import_module(name), "__version__", "?") for name in
            ("torch", "diffusers", "accelerate", "crispdiff")}
print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()),
      "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
import crispdiff.pipelines.pipeline_crispdiff  # noqa: F401
EOF
    echo "setup done at $(elapsed)s"
}

# copy_common_outputs STAGE...: into $OUT, summary.md, the sections the stages appended to this copy of RESULTS.md
# (date, machine, command, table, notes; when RECORD is empty, i.e. they recorded) and every named stage's log as
# log.txt. The caller sets OUT, WORK, RECORD and RESULTS_LINES (RESULTS.md's length before the stages).
copy_common_outputs() {
    mkdir -p "$OUT"
    cp "$WORK/summary.md" "$OUT/summary.md"
    if [ -z "$RECORD" ] && [ -f benchmarks/RESULTS.md ]; then
        tail -n +"$(( RESULTS_LINES + 1 ))" benchmarks/RESULTS.md >"$OUT/RESULTS-gpu.md"
    fi
    local stage
    for stage in "$@"; do
        [ -f "$WORK/$stage.log" ] && { echo "===== $stage.log"; tr '\r' '\n' <"$WORK/$stage.log" | grep -v '^\s*$'; }
    done >"$OUT/log.txt"
}
