#!/usr/bin/env bash
# One NVIDIA GPU, no internet: check the GPU training path end to end, then run the `gpu` tests.
#
#   scripts/gpu_check.sh [--size 0.5b|1.5b] [--steps N] [--skip-pytest] [--skip-bench] [--cpu-dry-run]
#
# 1. Installs what the image lacks (DeepSpeed, pydantic, fastapi, typer, ...; scripts/gpu_requirements.txt)
#    from wheel files in wheels/ beside the checkout (scripts/prepare_gpu_wheels.sh makes them on a
#    machine with a package index), with `pip install --no-index`, never touching the image's torch or
#    transformers: into an overlay venv (.gpu-check/venv, --system-site-packages) or, when the
#    image's Python already runs in a venv, into that venv.
# 2. scripts/gpu_check.py: builds a random-weight Qwen2 of a real size (0.5B by default) on the spot,
#    runs a few real `rl train` steps (bf16, DeepSpeed ZeRO-2 on NCCL, a local HF-engine worker:
#    no vLLM needed), resumes them from the checkpoint, and prints step time, tokens/s, peak GPU
#    memory against an estimate, and PASS/FAIL.
# 3. `pytest -m gpu tests/trainer/test_gpu.py` (ZeRO-3 bf16, ZeRO-Offload with DeepSpeed's CPU Adam -- JIT-compiled,
#    needs a C++ compiler --, CUDA RNG in checkpoints, HF engine vs trainer log-probs; vLLM's test is
#    skipped without vLLM).
# 4. scripts/bench_trainer.py --size SIZE --device cuda: the trainer's speed with realistic shapes (64 prompts x 8
#    completions of up to 1,024 tokens): tokens/s, MFU against the chip's bf16 peak, peak memory against `rl plan`.
# Exit 0 only if everything passed. --cpu-dry-run does all of it on a CPU (tiny shape, gloo): a check
# of this script. Work files go to .gpu-check/ (git-ignored; GPU_CHECK_DIR overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/wheels}
WORK=${GPU_CHECK_DIR:-$ROOT/.gpu-check}
SIZE=0.5b
STEPS=4
PYTEST=1
BENCH=1
CPU=0
while (($#)); do
  case $1 in
    --size) SIZE=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --skip-pytest) PYTEST=0; shift ;;
    --skip-bench) BENCH=0; shift ;;
    --cpu-dry-run) CPU=1; SIZE=tiny; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { printf '\033[1;34m[gpu-check]\033[0m %s\n' "$*"; }
die() { say "FAIL: $*"; exit 1; }
mkdir -p "$WORK"

# --- 1. the image ------------------------------------------------------------------------------
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$PY is older than Python 3.10"
"$PY" -c 'import torch, transformers' 2>/dev/null || die "the image's $PY must provide torch and transformers"
"$PY" -c 'import sys, torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, GPUs visible: {torch.cuda.device_count()}")'
if ((CPU == 0)); then
  "$PY" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null \
    || die "torch sees no CUDA GPU (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1)); --cpu-dry-run checks the script alone"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

# --- 2. missing packages from wheels/ ----------------------------------------------------------
if "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  RUN_PY=$PY  # already a venv: install beside its packages
else
  if [[ ! -x $WORK/venv/bin/python ]]; then
    say "overlay environment $WORK/venv (sees the image's packages)"
    "$PY" -m venv --system-site-packages --without-pip "$WORK/venv"
  fi
  RUN_PY=$WORK/venv/bin/python
fi
"$RUN_PY" -m pip --version >/dev/null 2>&1 || die "pip is not available to $PY"
# The image's torch and transformers stay as they are: a wheel that wanted others fails to resolve.
"$RUN_PY" -c 'from importlib.metadata import version
for name in ("torch", "transformers"): print(f"{name}=={version(name)}")' > "$WORK/constraints.txt"
[[ -d $WHEELS ]] || say "no $WHEELS: only what the image already has can be used"
say "installing what is missing from $WHEELS (pip --no-index)"
if ! "$RUN_PY" -m pip install --disable-pip-version-check --no-index --find-links "$WHEELS" \
      -c "$WORK/constraints.txt" -r scripts/gpu_requirements.txt deepspeed==0.19.8 > "$WORK/pip.log" 2>&1; then
  tail -15 "$WORK/pip.log"
  die "some packages are neither in the image nor in $WHEELS: run scripts/prepare_gpu_wheels.sh on a machine with a package index and copy wheels/ here"
fi
grep -E '^Successfully installed' "$WORK/pip.log" || say "nothing to install"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export SCATTER_RL_CACHE=$WORK/cache
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
"$RUN_PY" -c 'import deepspeed, rl.cli, rl.cli.launcher, rl.trainer.loop, rl.trainer.strategy, rollout_workers.worker, verifiers.pool' \
  2> "$WORK/import.log" || { tail -5 "$WORK/import.log"; die "the package does not import"; }
"$RUN_PY" -c 'import vllm' >/dev/null 2>&1 && say "vLLM present (the check still uses the HF engine)" \
  || say "no vLLM: the HF engine generates"

# --- 3. training steps -------------------------------------------------------------------------
status=0
say "rl train: random-qwen2-$SIZE, $STEPS steps + 1 after --resume"
checkargs=(--size "$SIZE" --steps "$STEPS" --work "$WORK")
if ((CPU)); then checkargs+=(--cpu --max-tokens 32 --n 4); fi
"$RUN_PY" scripts/gpu_check.py "${checkargs[@]}" || status=1

# --- 4. the gpu tests --------------------------------------------------------------------------
if ((PYTEST)); then
  say "pytest -m gpu tests/trainer/test_gpu.py"
  "$RUN_PY" -m pytest -m gpu tests/trainer/test_gpu.py -q -p no:cacheprovider || status=1
fi

# --- 5. the trainer's speed --------------------------------------------------------------------
if ((BENCH)); then
  say "scripts/bench_trainer.py --size $SIZE: tokens/s, MFU, peak memory against rl plan"
  if ((CPU)); then benchargs=(--device cpu --threads 2); else benchargs=(--device cuda); fi
  "$RUN_PY" scripts/bench_trainer.py --size "$SIZE" "${benchargs[@]}" 2> "$WORK/bench.log" || { tail -15 "$WORK/bench.log"; status=1; }
fi
if ((status == 0)); then say "PASS"; else say "FAIL (see above; work files in $WORK)"; fi
exit $status
