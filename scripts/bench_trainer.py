"""Benchmark one trainer step (forward + backward + AdamW) with and without prompt sharing, per dtype.

The batch is shaped like the quickstart's: `--prompts` GRPO groups of `--n`
completions, prompts of `--prompt-tokens` tokens, completion lengths drawn
uniformly from 1..`--max-tokens` (random token ids: the cost does not depend on
them). Each configuration runs the real `DeepSpeedStrategy` (ZeRO-0, one
process) for `--steps` timed steps after one warm-up step, all in this process,
so the ratios compare like with like. `trainer.share_prompt` runs each group's
prompt through the model once per micro-batch instead of once per completion.

    .venv/bin/python scripts/bench_trainer.py [--model smollm2-135m-instruct] [--dtypes float32 bfloat16]
        [--prompts 4] [--n 8] [--prompt-tokens 85] [--max-tokens 48] [--micro-batch 16] [--steps 3]
        [--threads 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.config import ModelConfig, TrainerConfig  # noqa: E402
from rl.strategy import DeepSpeedStrategy  # noqa: E402


def make_batch(args: argparse.Namespace, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(args.prompts):
        prompt = torch.randint(0, vocab, (args.prompt_tokens,), generator=g).tolist()
        for _ in range(args.n):
            length = int(torch.randint(1, args.max_tokens + 1, (1,), generator=g))
            rows.append((prompt, torch.randint(0, vocab, (length,), generator=g).tolist()))
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (p, c) in enumerate(rows):
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        mask[r, : len(p) + len(c)] = 1
    plen = torch.tensor([len(p) for p, _ in rows])
    completion = ((torch.arange(width)[None] >= plen[:, None]) & mask.bool()).float()
    return ids, mask, plen, completion


def time_steps(strategy: DeepSpeedStrategy, batch, share: bool, steps: int, micro: int) -> list[float]:
    ids, mask, plen, completion = batch
    weight = torch.linspace(-1.0, 1.0, ids.shape[0])
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        for part in torch.arange(ids.shape[0]).split(micro):
            logp, _ = strategy.token_logprobs(
                ids[part], mask[part], prompt_lengths=plen[part] if share else None, with_entropy=True
            )
            strategy.backward(-((logp * completion[part]).sum(-1) * weight[part]).sum() / completion.sum())
        strategy.step()
        times.append(time.perf_counter() - start)
    return times[1:]  # the first step warms up allocators and DeepSpeed buffers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=85, help="The quickstart's prompt is 85 tokens.")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    results: dict[tuple[str, bool], float] = {}
    for dtype in args.dtypes:
        trainer = TrainerConfig(zero_stage=0, micro_batch_size=args.micro_batch, threads=args.threads, lr=1e-6)
        strategy = DeepSpeedStrategy(ModelConfig(name=args.model, dtype=dtype), trainer)
        batch = make_batch(args, strategy.module.config.vocab_size)
        for share in (False, True):
            times = time_steps(strategy, batch, share, args.steps, args.micro_batch)
            results[dtype, share] = statistics.median(times)
            print(f"{dtype:9} share_prompt={share!s:5}  step {results[dtype, share]:.2f} s  "
                  f"(runs: {', '.join(f'{t:.2f}' for t in times)})", flush=True)  # fmt: skip
        strategy.close()
        del strategy
        gc.collect()

    base = results[args.dtypes[0], False]
    tokens = int(batch[3].sum())
    lines = [
        f"Model `{args.model}`; {args.prompts} groups x {args.n} completions, prompts of {args.prompt_tokens} tokens, "
        f"completions 1-{args.max_tokens} tokens ({tokens} completion tokens), micro-batch {args.micro_batch}, "
        f"{args.threads} threads, ZeRO-0, median of {args.steps} steps after a warm-up. One process, one run.",
        "",
        "| dtype | share_prompt | step (s) | completion tokens/s | speed vs first row |",
        "|---|---|---|---|---|",
    ]
    for (dtype, share), seconds in results.items():
        lines.append(f"| {dtype} | {share} | {seconds:.2f} | {tokens / seconds:.0f} | {base / seconds:.2f}x |")
    lines.append("")
    for dtype in args.dtypes:
        lines.append(f"Prompt sharing, {dtype}: {results[dtype, False] / results[dtype, True]:.2f}x faster per step.")
    if len(args.dtypes) > 1:
        first, other = args.dtypes[0], args.dtypes[1]
        lines.append(
            f"{other} weights vs {first}, both sharing: {results[first, True] / results[other, True]:.2f}x "
            "(on CPUs without fast low-precision training kernels fp32 trains faster; the quickstart trains in fp32 "
            "and lets the workers generate in bf16 via `rollout.dtype`)."
        )
    body = "\n".join(lines)
    print("\n" + body)
    if args.write_docs:
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_docs import replace_section

        replace_section("Trainer step", "scripts/bench_trainer.py", body)


if __name__ == "__main__":
    main()
