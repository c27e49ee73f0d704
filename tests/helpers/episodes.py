"""A `HubState` of an environment run over the tiny tokenizer, its `TaskRunner`, and a worker's turns."""

from __future__ import annotations

import asyncio
from pathlib import Path

from rl.config import load_config
from rl.hub.data import PromptSet, load_rows
from rl.hub.episode_store import EpisodeStore
from rl.hub.runner import TaskRunner
from rl.hub.state import HubState
from rl.hub.texts import TextDecoder
from rl.wire.protocol import Completion, LeaseRequest, RegisterRequest, SubmitRequest, TaskResult


def env_state(tokenizer, *overrides: str, ledger=None) -> HubState:
    """Guess-the-number (1..4, 3 turns), n=2, one prompt per step."""
    cfg = load_config(None, ["data.source.type=env", "data.source.size=8", "data.eval_size=0",
                             'data.source.params={"low": 1, "high": 4, "max_turns": 3}', "sampling.n=2",
                             "sampling.max_tokens=8", "trainer.prompts_per_step=1", "trainer.micro_batch_size=2",
                             "model.max_model_len=256", "data.max_prompt_tokens=128", "eval.every=0",
                             *overrides])  # fmt: skip
    train, evals = load_rows(cfg.data)
    held_out = PromptSet.build(evals, cfg.data, tokenizer) if evals else None
    state = HubState(cfg, PromptSet.build(train, cfg.data, tokenizer), vocab_size=len(tokenizer), ledger=ledger,
                     eval_prompts=held_out)  # fmt: skip
    state.policy_version = 0
    return state


def runner(state: HubState, tokenizer, db: Path | None = None) -> TaskRunner:
    state.episodes.end_ids = {tokenizer.eos_token_id}
    store = EpisodeStore(db) if db is not None else None
    return TaskRunner(state, tokenizer, store, TextDecoder(tokenizer))


def register(state: HubState, name: str = "w") -> str:
    return state.register(RegisterRequest(name=name), "tok", 0.0).worker_id


def lease(state: HubState, wid: str, now: float = 0.0, max_tasks: int = 8, version: int | None = None):
    version = state.policy_version if version is None else version
    return state.lease(LeaseRequest(worker_id=wid, policy_version=version, max_tasks=max_tasks), "tok", now)


def turn(tokenizer, text: str, end: bool = True) -> Completion:
    """What a worker generates for `text`: its ids (ending with end-of-turn), with made-up log-probs."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if end else [])
    return Completion(token_ids=ids, logprobs=[-0.25] * len(ids), finish_reason="stop")


def submit(state: HubState, run: TaskRunner, wid: str, lease_id: str, results: dict[int, list[Completion]],
           version: int | None = None, cached: dict[int, int] | None = None):  # fmt: skip
    """Submit `results` (task id -> completions; `cached`: the prompt tokens the worker says its prefix cache
    held, by task) and step the accepted ones like the service does."""
    version, cached = state.policy_version if version is None else version, cached or {}
    req = SubmitRequest(worker_id=wid, lease_id=lease_id, policy_version=version,
                        results=[TaskResult(task_id=t, completions=c, cached_prompt_tokens=cached.get(t, 0))
                                 for t, c in results.items()])  # fmt: skip
    answer, jobs = state.submit(req, "tok", 1.0)

    async def step_all():
        for job in jobs:
            await run.advance(job)

    asyncio.run(step_all())
    return answer
