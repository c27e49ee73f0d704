"""One path for every task (rl/hub/runner.py): a plain dataset is the one-turn environment `Verified`,
graded in the real verifier pool; a one-turn environment's group is its completions as submitted; a
failing grade of any environment is retried, then its task dropped with nothing left behind; a grade that
comes back after its task was given up (a quarantine) buffers nothing and leaves nothing behind."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import pytest
from helpers.episodes import env_state, lease, register, submit, turn

from rl.config import RewardTerm, load_config
from rl.envs.base import Grade
from rl.envs.guess import GuessNumber
from rl.envs.verified import Verified
from rl.hub.data import PromptSet
from rl.hub.episode_store import EpisodeStore
from rl.hub.runner import TaskRunner
from rl.hub.state import MAX_SCORING_ATTEMPTS, HubState
from rl.hub.texts import TextDecoder
from rl.wire.packed import as_ids, as_logprobs
from rl.wire.protocol import SubmitRequest, TaskResult
from verifiers.pool import VerifierPool


def plain_state(tokenizer) -> HubState:
    cfg = load_config(None, ["sampling.n=2", "sampling.max_tokens=32", "trainer.prompts_per_step=1",
                             "trainer.micro_batch_size=2", "eval.every=0"])  # fmt: skip
    rows = [{"question": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(4)]
    state = HubState(cfg, PromptSet.build(rows, cfg.data, tokenizer), vocab_size=len(tokenizer))
    state.policy_version = 0
    return state


def test_a_plain_dataset_is_the_one_turn_environment_graded_in_the_verifier_pool(tiny_tokenizer):
    tok, state = tiny_tokenizer, plain_state(tiny_tokenizer)
    with VerifierPool([RewardTerm(name="math")], workers=1) as pool:
        seen = []

        async def score(items, worker_id):
            seen.append(([text for text, _ in items], worker_id))
            return await pool.score_many(items, processes=1)

        run = TaskRunner(state, tok, None, TextDecoder(tok), Verified(score))
        wid = register(state)
        granted = lease(state, wid, max_tasks=1)
        (task,) = granted.tasks
        answer = state.prompts.rows[state.task_rows[task.task_id]]["answer"]
        sent = [turn(tok, f"The answer is \\boxed{{{answer}}}"), turn(tok, "The answer is \\boxed{99}")]
        submit(state, run, wid, granted.lease_id, {task.task_id: sent})
    (group,) = state.buffer.values()
    assert [c.reward for c in group.completions] == [1.0, 0.0]
    # The verifier scored the completion's own text, special tokens kept, the final end-of-sequence cut.
    assert seen == [([tok.decode(c.token_ids[:-1], skip_special_tokens=False) for c in sent], wid)]
    for c, s in zip(group.completions, sent, strict=True):  # forwarded packed, as submitted
        assert isinstance(c.token_ids, str) and as_ids(c.token_ids).tolist() == s.token_ids
        assert as_logprobs(c.logprobs).tolist() == s.logprobs and not c.turns
    assert group.score_s > 0 and not state.scoring and not state.episodes.groups


@dataclass(frozen=True)
class OneGuess(GuessNumber):
    """Guess-the-number in a single turn (a one-turn environment of the user's own)."""

    max_turns: int = 1


def test_a_one_turn_environment_keeps_no_episodes_and_its_step_rewards_join_the_grade(tiny_tokenizer):
    tok, state = tiny_tokenizer, env_state(tiny_tokenizer)
    run = TaskRunner(state, tok, None, TextDecoder(tok), OneGuess(low=1, high=4))
    wid = register(state)
    granted = lease(state, wid, max_tasks=1)
    (task,) = granted.tasks
    secret = state.prompts.rows[state.task_rows[task.task_id]]["answer"]
    submit(state, run, wid, granted.lease_id, {task.task_id: [turn(tok, str(secret)), turn(tok, "no idea")]})
    (group,) = state.buffer.values()
    right, wrong = group.completions
    assert right.reward == pytest.approx(0.95) and right.components["valid_guess"] == 1.0
    assert wrong.reward == pytest.approx(-0.05) and wrong.components == {"correct": 0.0, "turns": 1.0,
                                                                          "valid_guess": 0.0}  # fmt: skip
    assert not state.episodes.groups and not state.episodes.queue and lease(state, wid).tasks[0].task_id < 1 << 40


@dataclass(frozen=True)
class FlakyGrade(GuessNumber):
    """Guess-the-number whose grade fails its first `failures` calls (a grader with a broken dependency)."""

    failures: int = 1
    calls: list[int] = field(default_factory=lambda: [0], compare=False)

    def grade(self, state):
        self.calls[0] += 1
        if self.calls[0] <= self.failures:
            raise RuntimeError("grader unavailable")
        return Grade(1.0, {})


def play_to_the_end(state, run, tok, wid) -> int:
    """Both episodes of the next task guess 0 (never the secret) until they run out of turns."""
    granted = lease(state, wid, max_tasks=1)
    (task,) = granted.tasks
    submit(state, run, wid, granted.lease_id, {task.task_id: [turn(tok, "0"), turn(tok, "0")]})
    while state.episodes.queue:
        granted = lease(state, wid)
        submit(state, run, wid, granted.lease_id, {t.task_id: [turn(tok, "0")] for t in granted.tasks})
    return task.task_id


def test_a_failing_grade_is_retried_and_the_group_buffered(tiny_tokenizer):
    tok, state = tiny_tokenizer, env_state(tiny_tokenizer)
    state.scoring_retry_s = 0.01
    run = TaskRunner(state, tok, None, TextDecoder(tok), FlakyGrade(low=1, high=4, max_turns=3, failures=1))
    task = play_to_the_end(state, run, tok, register(state))
    assert list(state.buffer) == [task] and state.scoring_failures == 1 and state.scoring_dropped == 0
    assert "grader unavailable" in state.last_scoring_error and not state.scoring


def test_a_grade_that_keeps_failing_drops_its_task_and_its_saved_episodes(tiny_tokenizer, tmp_path):
    tok, state = tiny_tokenizer, env_state(tiny_tokenizer)
    state.scoring_retry_s = 0.01
    store = EpisodeStore(tmp_path / "hub.sqlite")
    env = FlakyGrade(low=1, high=4, max_turns=3, failures=MAX_SCORING_ATTEMPTS)
    run = TaskRunner(state, tok, store, TextDecoder(tok), env)
    wid = register(state)
    task = play_to_the_end(state, run, tok, wid)
    assert not state.buffer and task not in state.task_rows and task not in state.scoring
    assert state.scoring_dropped == 1 and state.scoring_failures == MAX_SCORING_ATTEMPTS
    assert not state.episodes.groups and store.load() == {}
    again = lease(state, wid, max_tasks=1)  # its room in the window is free again
    assert again.tasks and again.tasks[0].task_id != task


def test_a_group_given_up_while_it_is_graded_is_not_buffered_even_once_submitted_again(tiny_tokenizer):
    """A quarantine while the verifiers score: the task went back to the queue, and another worker took it and
    submitted before the late grade came back; the late grade buffers nothing, the new one the new completions."""
    tok, state = tiny_tokenizer, plain_state(tiny_tokenizer)
    release = asyncio.Event()

    async def score(items, worker_id):
        if worker_id == bad:
            await release.wait()
        return [Grade(float(worker_id == good), {}) for _ in items]

    run = TaskRunner(state, tok, None, TextDecoder(tok), Verified(score))
    bad, good = register(state, "bad"), register(state, "good")

    def job_of(wid):
        granted = lease(state, wid, max_tasks=1)
        (task,) = granted.tasks
        req = SubmitRequest(worker_id=wid, lease_id=granted.lease_id, policy_version=0,
                            results=[TaskResult(task_id=task.task_id, completions=[turn(tok, "1")] * 2)])  # fmt: skip
        return task.task_id, state.submit(req, "tok", 1.0)[1][0]

    async def both():
        tid, late = job_of(bad)
        grading = asyncio.create_task(run.advance(late))
        await asyncio.sleep(0.05)
        assert tid in state.scoring
        state.drop_worker_work(bad)  # what a quarantine does: the task is first in the queue again
        again, job = job_of(good)
        assert again == tid
        release.set()
        await grading
        assert not state.buffer and state.scoring[tid] == (good, 0)  # the late grade changed nothing
        await run.advance(job)

    asyncio.run(both())
    (group,) = state.buffer.values()
    assert group.worker_id == good and [c.reward for c in group.completions] == [1.0, 1.0] and not state.scoring


@dataclass(frozen=True)
class HeldGrade(GuessNumber):
    """Guess-the-number whose grade waits for `GATE` (a grader that takes its time)."""

    def grade(self, state):
        assert GATE.wait(30)
        return super().grade(state)


GATE = threading.Event()


def test_episodes_given_up_while_graded_leave_nothing_behind(tiny_tokenizer, tmp_path):
    """A quarantine while an environment grades a finished group: no group, no episodes in memory or on disk."""
    tok, state = tiny_tokenizer, env_state(tiny_tokenizer)
    GATE.clear()
    store = EpisodeStore(tmp_path / "hub.sqlite")
    run = TaskRunner(state, tok, store, TextDecoder(tok), HeldGrade(low=1, high=4, max_turns=2))
    wid = register(state)
    granted = lease(state, wid, max_tasks=1)
    (task,) = granted.tasks
    submit(state, run, wid, granted.lease_id, {task.task_id: [turn(tok, "0"), turn(tok, "0")]})
    assert store.load()  # the first turns are saved
    last = lease(state, wid)
    results = [TaskResult(task_id=t.task_id, completions=[turn(tok, "0")]) for t in last.tasks]
    req = SubmitRequest(worker_id=wid, lease_id=last.lease_id, policy_version=0, results=results)
    _, jobs = state.submit(req, "tok", 1.0)

    async def grade_then_quarantine():
        await asyncio.gather(*(run.advance(j) for j in jobs[:-1]))
        grading = asyncio.create_task(run.advance(jobs[-1]))  # the group's last turn: graded in a thread
        for _ in range(3000):  # until the group's grade is running (the task, not a turn, is then scored)
            if task.task_id in state.scoring:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the finished group never reached its grade")
        state.drop_worker_work(wid)
        GATE.set()
        await grading

    asyncio.run(grade_then_quarantine())
    assert not state.buffer and task.task_id in state.queue and not state.scoring
    assert not state.episodes.groups and store.load() == {}
