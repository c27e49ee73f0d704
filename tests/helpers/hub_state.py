"""A `HubState` over ten tiny prompts, and what a worker and the scorer do to it, without HTTP."""

from __future__ import annotations

from rl.config import load_config
from rl.hub.data import PromptSet
from rl.hub.state import HubState, ScoringJob
from rl.wire.protocol import Completion, RegisterRequest, SubmitRequest, TaskResult
from verifiers import Reward

N = 2


def make_state(**overrides) -> HubState:
    args = [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config(None, ["sampling.n=2", "sampling.max_tokens=4", "trainer.prompts_per_step=2",
                             "trainer.micro_batch_size=2", *args])  # fmt: skip
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(10)]
    prompts = PromptSet(rows=rows, prompt_ids=[[1, 2, i] for i in range(10)], skipped_too_long=0)
    state = HubState(cfg, prompts, vocab_size=50)
    state.policy_version = 0
    return state


def register(state: HubState, caller: str = "tok-a", now: float = 0.0) -> str:
    return state.register(RegisterRequest(name="w"), caller, now).worker_id


def good_result(tid: int) -> TaskResult:
    return TaskResult(task_id=tid, completions=[Completion(token_ids=[3, 4], logprobs=[-0.5, -1.0])] * N)


def submit(state: HubState, wid: str, lease_id: str, tids, version=0, caller="tok-a"):
    """Submit good results for `tids`; returns (accepted, duplicates) and keeps the scoring jobs on `state`."""
    req = SubmitRequest(
        worker_id=wid, lease_id=lease_id, policy_version=version, results=[good_result(t) for t in tids]
    )
    answer, jobs = state.submit(req, caller, 1.0)
    assert [j.task_id for j in jobs] == answer.accepted
    pending_jobs(state).update({j.task_id: j for j in jobs})
    return answer.accepted, answer.duplicates


def pending_jobs(state: HubState) -> dict[int, ScoringJob]:
    return state.__dict__.setdefault("_test_jobs", {})


def score(state: HubState, tid: int, version: int = 0, rewards=(0.0, 1.0)) -> None:
    """What the scorer does with a job: the verifier's rewards back to the state."""
    job = pending_jobs(state).pop(tid)
    assert job.policy_version == version
    state.finish_scoring(job, [Reward(value=r, components={"t": r}) for r in rewards])
