#!/usr/bin/env bash
# The third-party environments' venv (./.venv-envs): Prime Intellect's verifiers (with reasoning-gym)
# and TextArena, pinned, in an interpreter of their own. The hub runs their environments in a child
# process with this venv (rl/envs/third_party.py): that `verifiers` cannot be imported beside this
# project's own `verifiers` package. Idempotent: a second run checks the stamp and returns fast.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SCATTER_RL_ENVS_VENV:-$PWD/.venv-envs}
PY=${PYTHON:-python3}
PINS=("verifiers[rg]==0.3.1" "textarena==0.7.4")
say() { printf '\033[1;34m[setup-envs]\033[0m %s\n' "$*"; }

STAMP=$(printf '%s ' "${PINS[@]}" | sha256sum | cut -c1-16)
if [[ -f "$VENV/.scatter-rl-envs" && "$(cat "$VENV/.scatter-rl-envs")" == "$STAMP" ]] \
   && "$VENV/bin/python" -I -c "import verifiers.legacy, textarena" >/dev/null 2>&1; then
  say "environments' venv up to date ($VENV)"
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }
say "installing ${PINS[*]} (no torch: about 900 MB)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}"
echo "$STAMP" > "$VENV/.scatter-rl-envs"
say "environments' venv ready: $VENV"
