#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that benchmarks/gpu/run.sh installs on the lent GPU machine.
# That machine has no network and has torch, accelerate, transformers, huggingface_hub, safetensors, pyarrow, pandas,
# xxhash, einops ... but not diffusers, spandrel, datasets, dill or multiprocess (device/KINDS.md lists its packages).
#
#   bash benchmarks/gpu/fetch_wheels.sh                # ~8 MB into benchmarks/gpu/wheels/
#   WITH_PYARROW=1 bash benchmarks/gpu/fetch_wheels.sh # + pyarrow 24 (~49 MB), only if the device's pyarrow is too
#                                                      #   old for datasets (run.sh says so); near the 64 MiB limit
#
# Versions follow this machine's environment (diffusers 0.42.1 ...), for Python 3.12 (python3 on the device) on
# manylinux x86-64; --no-deps with an explicit list, so nothing the device already has is replaced. The folder is
# written whole or not at all, and ignores itself in git (a .gitignore inside it).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEST=${WHEELS_DIR:-$HERE/wheels}
PY=${PYTHON:-python3}
PYVER=${GPU_PYTHON_VERSION:-3.12}

# version NAME DEFAULT: the version installed here (so the device runs what was tested here), else DEFAULT.
version() {
    "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || echo "$2"
}
PACKAGES=(
    "diffusers==$(version diffusers 0.42.1)"
    "spandrel==$(version spandrel 0.4.2)"
    "datasets==$(version datasets 5.2.0)"
    "dill==$(version dill 0.4.1)"
    "multiprocess==$(version multiprocess 0.70.19)"
)
if [ "${WITH_PYARROW:-0}" = 1 ]; then
    PACKAGES+=("pyarrow==${PYARROW_VERSION:-24.0.0}")
fi

STAGING=$(mktemp -d "$(dirname "$DEST")/.wheels.XXXXXX")
trap 'rm -rf "$STAGING"' EXIT
echo "downloading for Python $PYVER manylinux x86_64: ${PACKAGES[*]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$STAGING" "${PACKAGES[@]}"
printf '*\n' >"$STAGING/.gitignore"

total_kb=$(du -sk "$STAGING" | cut -f1)
if [ "$total_kb" -gt 40960 ] && [ "${WITH_PYARROW:-0}" != 1 ]; then
    echo "the wheels take ${total_kb} KB, more than the 40 MB planned; check the list above" >&2
    exit 1
fi
rm -rf "$DEST"
mv "$STAGING" "$DEST"
trap - EXIT
ls -l "$DEST"
echo "total: $(du -sh "$DEST" | cut -f1) in $DEST (carry it: \"benchmarks/gpu/wheels\")"
