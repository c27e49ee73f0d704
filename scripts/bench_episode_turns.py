"""Hub CPU per episode turn (lease + submission checks + environment step + rendering + bookkeeping + SQLite save),
against a baseline measured in the same run: the same hub handing out and accepting plain single-turn tasks.

In-process `HubState` and `TaskRunner` (what the HTTP routes call; HTTP and JSON parsing excluded in both),
SmolLM2-135M-Instruct's tokenizer (`rl models prepare smollm2-135m-instruct`), guess-the-number, n=8, two workers
taking turns; the model's turns are made-up guesses. Interleaved repeats; prints median and spread.
Also counts the prefix tokens a turn lease sends to the worker that generated the episode's previous turn.
Usage: python scripts/bench_episode_turns.py [--repeats 3] [--tasks 24]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from rl.config import load_config
from rl.hub.data import PromptSet, load_rows
from rl.hub.episode_store import EpisodeStore
from rl.hub.runner import TaskRunner
from rl.hub.state import HubState
from rl.hub.texts import TextDecoder
from rl.models import resolve_model
from rl.wire.protocol import Completion, LeaseRequest, RegisterRequest, SubmitRequest, TaskResult

BASE = ["sampling.n=8", "sampling.max_tokens=8", "trainer.prompts_per_step=64", "trainer.micro_batch_size=8",
        "hub.max_tasks_per_lease=64", "hub.max_leased_per_worker=4096", "data.eval_size=0", "async.max_staleness=64",
        "hub.buffer_size=4096", "model.max_model_len=512", "data.max_prompt_tokens=256", "eval.every=0"]  # fmt: skip


def state_for(tok, env: bool) -> HubState:
    extra = [
        "data.source.type=env",
        "data.source.size=256",
        'data.source.params={"low": 1, "high": 16, "max_turns": 4}',
    ]
    cfg = load_config(None, BASE + (extra if env else ["data.source.size=256"]))
    state = HubState(cfg, PromptSet.build(load_rows(cfg.data)[0], cfg.data, tok), vocab_size=len(tok))
    state.policy_version = 0
    return state


def turn(tok, rng) -> Completion:
    ids = tok(str(rng.randint(1, 16)), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return Completion(token_ids=ids, logprobs=[-0.5] * len(ids))


def run(tok, env: bool, tasks: int, seed: int) -> tuple[float, int, int, int]:
    """(CPU seconds, turns, prefix tokens sent to the same worker, prefix tokens sent) of `tasks` tasks."""
    rng = random.Random(seed)
    state = state_for(tok, env)
    runner = None
    if env:
        state.episodes.end_ids = {tok.eos_token_id}
        db = EpisodeStore(Path(tempfile.mkdtemp()) / "hub.sqlite")
        runner = TaskRunner(state, tok, db, TextDecoder(tok))
    workers = [state.register(RegisterRequest(name=f"w{i}"), "tok", 0.0).worker_id for i in range(2)]
    loop = asyncio.new_event_loop()
    turns = same = sent = 0
    t0 = time.process_time()
    started = 0
    for k in range(10_000):
        wid = workers[k % 2]
        lease = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=8), "tok", 0.0)
        if lease.lease_id is None or (lease.sampling.n > 1 and started >= tasks):
            break  # every episode is done (turns are leased before new tasks)
        started += len(lease.tasks) if lease.sampling.n > 1 else 0
        if env and lease.sampling.n == 1:
            for t in lease.tasks:
                ep = state.episodes._episode(t.task_id)
                sent += len(t.prompt_token_ids)
                same += len(t.prompt_token_ids) if ep.worker_id == wid else 0
        results = [TaskResult(task_id=t.task_id, completions=[turn(tok, rng) for _ in range(lease.sampling.n)])
                   for t in lease.tasks]  # fmt: skip
        req = SubmitRequest(worker_id=wid, lease_id=lease.lease_id, policy_version=0, results=results)
        _, jobs = state.submit(req, "tok", 0.0)
        turns += sum(len(r.completions) for r in results)
        if runner is not None:
            for job in jobs:
                loop.run_until_complete(runner.advance(job))
        else:
            for job in jobs:
                state.scoring.pop(job.task_id, None)
    cpu = time.process_time() - t0
    loop.close()
    return cpu, turns, same, sent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=24)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    per_turn, per_plain, reuse = [], [], []
    for r in range(args.repeats):
        cpu, turns, same, sent = run(tok, True, args.tasks, r)
        per_turn.append(1e3 * cpu / turns)
        reuse.append(same / max(sent, 1))
        cpu, done, _, _ = run(tok, False, args.tasks, r)
        per_plain.append(1e3 * cpu / done)
    ratios = [a / b for a, b in zip(per_turn, per_plain, strict=True)]
    print(f"episode turn: {statistics.median(per_turn):.3f} ms CPU (min {min(per_turn):.3f}, max {max(per_turn):.3f})")
    print(f"plain completion: {statistics.median(per_plain):.3f} ms CPU (min {min(per_plain):.3f}, "
          f"max {max(per_plain):.3f})")  # fmt: skip
    print(
        f"ratio turn / plain completion: {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})"
    )
    print(f"prefix tokens sent to the worker that made the previous turn: {statistics.median(reuse):.1%}")


if __name__ == "__main__":
    main()
