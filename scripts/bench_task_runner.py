"""What the one path costs a plain submission: `TaskRunner.advance` against the hub's former direct path.

Since issue 18.1 a plain dataset's task goes through the environment runner (rl/hub/runner.py): per
completion a `reset` and a `step` of `Verified` (rl/envs/verified.py), then the grade through
`grade_many`. Before, the hub decoded the texts and handed them to the verifier pool itself. Both are
timed here on the same jobs in one process (8 completions of 256-1,024 tokens over a tiny model's
tokenizer, an instant scorer in place of the pool, whose processes are not the hub's CPU), as the
process CPU time per submission, in interleaved rounds; the former path is re-enacted from what it
did (decode with special tokens kept and the final end-of-sequence token cut, then
`HubState.finish_scoring`).

    taskset -c 0 .venv/bin/python scripts/bench_task_runner.py [--rounds 40] [--submissions 300]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_hub import tiny_model
from transformers import AutoTokenizer

from rl.config import load_config
from rl.envs.verified import Verified
from rl.hub.data import PromptSet
from rl.hub.runner import TaskRunner
from rl.hub.state import HubState, ScoringJob
from rl.hub.texts import TextDecoder
from rl.wire.packed import PackedCompletion, pack_ids, pack_logprobs
from verifiers.base import Reward

GROUP, JOBS = 8, 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--submissions", type=int, default=300)
    args = ap.parse_args()
    model, vocab = tiny_model(Path(tempfile.mkdtemp()))
    tok = AutoTokenizer.from_pretrained(model)
    cfg = load_config(None, [f"sampling.n={GROUP}", "sampling.max_tokens=1024", "model.max_model_len=2048"])
    row = {"question": "q", "answer": "1"}
    state = HubState(cfg, PromptSet.build([row], cfg.data, tok), vocab_size=vocab)
    rng = np.random.default_rng(0)

    def completion() -> PackedCompletion:
        n = int(rng.integers(256, 1025))
        ids, lps = rng.integers(3, vocab, n).astype(np.int32), -rng.random(n).astype(np.float32)
        return PackedCompletion(ids, lps, "stop", pack_ids(ids), pack_logprobs(lps))

    groups = [[completion() for _ in range(GROUP)] for _ in range(JOBS)]
    rewards = [Reward(value=1.0, components={"format": 1.0})] * GROUP

    async def instant(items, worker_id):
        return rewards

    decode, stop = TextDecoder(tok), {tok.eos_token_id}
    runner = TaskRunner(state, tok, None, decode, Verified(instant))

    def job(k: int) -> ScoringJob:
        state.scoring[k], state.task_rows[k] = ("w", 0), 0
        return ScoringJob(task_id=k, example=row, completions=groups[k % JOBS], policy_version=0, worker_id="w",
                          worker_name="w")  # fmt: skip

    async def one_path(n: int) -> None:
        for k in range(n):
            await runner.advance(job(k))

    async def former(n: int) -> None:
        for k in range(n):
            j = job(k)
            cut = [c.ids[:-1] if len(c.ids) and int(c.ids[-1]) in stop else c.ids for c in j.completions]
            texts = decode(cut, skip_special_tokens=False)
            state.finish_scoring(j, await instant([(t, j.example) for t in texts], j.worker_id))

    runs: dict[str, list[float]] = {"former": [], "one path": []}
    for r in range(args.rounds):
        order = [("former", former), ("one path", one_path)]
        for name, fn in order if r % 2 else order[::-1]:
            t = time.process_time()
            asyncio.run(fn(args.submissions))
            runs[name].append((time.process_time() - t) / args.submissions * 1e6)
            state.buffer.clear()
    print("| path | hub CPU µs / submission: min | p25 | median |\n| --- | ---: | ---: | ---: |")
    for name, v in runs.items():
        v = sorted(v)
        print(f"| {name} | {v[0]:.0f} | {v[len(v) // 4]:.0f} | {v[len(v) // 2]:.0f} |")


if __name__ == "__main__":
    main()
