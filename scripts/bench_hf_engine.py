"""The HF engine's generation with prompts batched per step and one prefill per prompt, against one prompt per step
with every row prefilled (what it did before), and batching alone.

One `HFEngine` in this process (the config's model and rollout dtype), the config's first `--prompts` prompts
(templated as the hub does) x `sampling.n`, seeded draws (so both modes generate the same tokens: the same work),
`sampling.max_tokens`. Baseline: `batch_rows = n`, one prompt per `step()`, `share_prefill` off; batched: the
engine's default (`BATCH_ROWS` of its device), with and without `share_prefill`. `--repeats` rounds interleave
them (alternating the order); tokens/s of each (median, min-max) and the ratio of the engine's default to the
baseline in each round. Pin it for a fair number:

    taskset -c 0,1 .venv/bin/python scripts/bench_hf_engine.py [--config configs/quickstart.yaml] [--prompts 16]
        [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_worker import interleave, ratio_table  # noqa: E402


def timed(engine, prompts: list[list[int]], sampling, batch_rows: int, share_prefill: bool = True) -> dict:
    engine.batch_rows, engine.share_prefill = batch_rows, share_prefill
    seeds = [[1000 * i + j for j in range(sampling.n)] for i in range(len(prompts))]
    start = time.perf_counter()
    for i, (prompt, sd) in enumerate(zip(prompts, seeds, strict=True)):
        engine.add(i, prompt, sampling, sd)
    tokens = steps = 0
    while engine.pending:
        for _, completions in engine.step():
            tokens += sum(len(c.token_ids) for c in completions)
        steps += 1
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    from rl.config import load_config
    from rl.hub.data import PromptSet, load_rows
    from rl.models import resolve_model
    from rl.wire.protocol import SamplingParamsWire
    from rollout_workers.engines import EngineSpec
    from rollout_workers.engines.hf_engine import HFEngine

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [])
    model = resolve_model(cfg.model.name)
    tok = AutoTokenizer.from_pretrained(model)
    prompts = PromptSet.build(load_rows(cfg.data)[0][: args.prompts], cfg.data, tok).prompt_ids
    sampling = SamplingParamsWire.of(cfg.sampling)  # what the hub leases
    dtype = cfg.rollout.dtype or cfg.model.dtype
    engine = HFEngine(EngineSpec(kind="hf"), model, max_model_len=cfg.model.max_model_len, dtype=dtype)
    batched = engine.batch_rows
    modes = {"one prompt per step, every row prefilled (before)": (sampling.n, False),
             f"batched ({batched} rows), every row prefilled": (batched, False),
             f"batched ({batched} rows), one prefill per prompt": (batched, True)}  # fmt: skip
    timed(engine, prompts[:2], sampling, batched)  # warm-up
    _, rate = interleave(args.repeats, list(modes), lambda m: timed(engine, prompts, sampling, *modes[m]))
    one, _, many = list(modes)
    print(f"\n`{cfg.model.name}` ({dtype}), {len(prompts)} prompts of `{args.config.name}` x n={sampling.n}, "
          f"max_tokens={sampling.max_tokens}, seeded draws, {args.threads} threads, "
          f"{args.repeats} interleaved rounds")  # fmt: skip
    print(ratio_table(rate, "hf engine", many, one, "batched + one prefill / before"))


if __name__ == "__main__":
    main()
