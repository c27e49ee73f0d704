#!/usr/bin/env bash
# Set up (idempotent), prepare SmolLM2-135M-Instruct offline, and run the quickstart RL job on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/rl models prepare smollm2-135m-instruct
exec .venv/bin/rl train configs/quickstart.yaml "$@"
