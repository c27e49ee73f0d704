#!/usr/bin/env bash
# Prepare wheels/ for scripts/gpu_check.sh on an air-gapped GPU machine (run this where PyPI is reachable).
#
#   scripts/prepare_gpu_wheels.sh [DIR]        (default DIR: wheels/, git-ignored)
#
# - scripts/gpu_requirements.txt with their dependencies, as binary wheels for CPython 3.10-3.13
#   on manylinux x86_64 (the GPU image's Python version is not known in advance): pure-Python
#   wheels once, compiled ones (pydantic-core) once per version;
# - DeepSpeed 0.19.8 as a pure-Python wheel built from its source with DS_BUILD_OPS=0: its C++/CUDA
#   ops are JIT-compiled on the GPU machine when first used (needs a compiler there; only ZeRO-Offload's
#   CPU Adam does in the check).
# Nothing here installs anything or needs torch. The total is printed; keep it well under the
# 64 MiB a device call carries with the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-wheels}
PY=${PYTHON:-python3}
PYTHONS=${GPU_WHEEL_PYTHONS:-"3.10 3.11 3.12 3.13"}
DEEPSPEED=deepspeed==0.19.8
say() { printf '\033[1;34m[wheels]\033[0m %s\n' "$*"; }

mkdir -p "$OUT"
PIP=("$PY" -m pip --disable-pip-version-check)
for version in $PYTHONS; do
  say "dependencies for CPython $version"
  "${PIP[@]}" download --quiet --dest "$OUT" --only-binary=:all: --implementation cp \
    --python-version "$version" --abi "cp${version/./}" --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform linux_x86_64 --platform any \
    -r scripts/gpu_requirements.txt exceptiongroup tomli
done

if ! ls "$OUT"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  say "building $DEEPSPEED (pure Python, DS_BUILD_OPS=0)"
  DS_BUILD_OPS=0 "${PIP[@]}" wheel --quiet --no-deps --wheel-dir "$OUT" "$DEEPSPEED"
fi

total=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
say "$(ls "$OUT"/*.whl | wc -l) wheels in $OUT: $((total / 1024)) KiB ($(awk "BEGIN {printf \"%.1f\", $total / 1048576}") MiB)"
if (( total > 60 * 1024 * 1024 )); then
  say "warning: over 60 MiB; a device call carries at most 64 MiB with the checkout"
fi
