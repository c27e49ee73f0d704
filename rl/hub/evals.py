"""Evaluation jobs: one policy version on the held-out prompts, leased to workers beside training.

The trainer asks for an evaluation (`POST /v1/evals`); `EvalJobs` turns it into
tasks with their own ids, queue and results, and `HubState` (rl/hub/state.py)
only asks it two things: "next eval tasks for a worker at version v" and "is
this an eval task" (then it hands the task here to check, score or re-queue).
Eval tasks never enter the training ledger: they are not in the data order, not
counted as consumed, and a finished job is forgotten once its results are read.

Task ids on the wire are ints; eval ids are negative (-1, -2, ...), so they can
never collide with training tasks, whose ids are the data order's sequence
numbers (>= 0). In an environment run an eval task is a group of episodes
(rl/hub/episodes.py): its later turns have negative ids of their own, and its
result is the environment's grades (`record_episodes`).
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from rl.hub.data import PromptSet
from rl.wire.packed import PackedCompletion
from rl.wire.protocol import (
    EvalCompletion,
    EvalJob,
    EvalRequest,
    EvalTaskResult,
    HubError,
    LeasedTask,
    SamplingParamsWire,
)


@dataclass
class _Job:
    job_id: str
    version: int
    sampling: SamplingParamsWire
    rows: dict[int, int]  # task id -> held-out row index
    queue: deque[int]
    results: dict[int, EvalTaskResult] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)
    """Tasks whose scoring kept failing: given up, counted as done without a result."""

    @property
    def finished(self) -> bool:
        return len(self.results) + len(self.failed) == len(self.rows)


class EvalJobs:
    """Every open evaluation job of the hub, and the ids, queue and results of their tasks."""

    def __init__(self, prompts: PromptSet | None) -> None:
        self.prompts = prompts
        self._jobs: dict[str, _Job] = {}
        self._job_of: dict[int, str] = {}  # task id -> job id
        self._next_id = -1

    def __contains__(self, task_id: int) -> bool:
        """Is `task_id` a task of an open eval job?"""
        return task_id in self._job_of

    def __len__(self) -> int:
        return len(self._jobs)

    def start(self, req: EvalRequest, current_version: int, sampling: SamplingParamsWire) -> EvalJob:
        """A new job for the first `req.num_prompts` held-out prompts; `sampling`: the run's, n and T from `req`."""
        if self.prompts is None or len(self.prompts) == 0:
            raise HubError(422, "no_eval_data", "this run has no held-out prompts (data.eval_size = 0)")
        if req.version != current_version:
            raise HubError(422, "not_current", f"can only evaluate the current version {current_version}")
        rows = {}
        for row in range(min(req.num_prompts, len(self.prompts))):
            rows[self._next_id] = row
            self._next_id -= 1
        job = _Job(
            job_id=f"e-{secrets.token_hex(4)}",
            version=req.version,
            sampling=sampling.model_copy(update={"n": req.n, "temperature": req.temperature}),
            rows=rows,
            queue=deque(sorted(rows, reverse=True)),  # -1, -2, ...: held-out row order
        )
        self._jobs[job.job_id] = job
        self._job_of.update(dict.fromkeys(rows, job.job_id))
        return self.report(job.job_id)

    def next_tasks(self, version: int, max_tasks: int) -> tuple[list[LeasedTask], SamplingParamsWire] | None:
        """Up to `max_tasks` queued tasks of a job for `version` (a worker holding that version), or None."""
        job = next((j for j in self._jobs.values() if j.queue and j.version == version), None)
        if job is None:
            return None
        assert self.prompts is not None
        tids = [job.queue.popleft() for _ in range(min(max_tasks, len(job.queue)))]
        tasks = [LeasedTask(task_id=t, prompt_token_ids=self.prompts.prompt_ids[job.rows[t]]) for t in tids]
        return tasks, job.sampling

    def requeue(self, task_id: int) -> None:
        """Back to the front of its job's queue (an expired lease, a scoring retry)."""
        job = self._job(task_id)
        if task_id not in job.results and task_id not in job.failed:
            job.queue.appendleft(task_id)

    def expected_n(self, task_id: int, version: int) -> int:
        """Completions a submission of `task_id` must carry; refuses a version other than the job's."""
        job = self._job(task_id)
        if version != job.version:
            raise HubError(422, "wrong_version", f"eval task {task_id} is for version {job.version}")
        return job.sampling.n

    def example(self, task_id: int) -> tuple[int, dict[str, Any]]:
        """(held-out row index, row) of an eval task, for the verifier."""
        assert self.prompts is not None
        row = self._job(task_id).rows[task_id]
        return row, self.prompts.rows[row]

    def prompt_ids(self, task_id: int) -> list[int]:
        assert self.prompts is not None
        return self.prompts.prompt_ids[self._job(task_id).rows[task_id]]

    def job_of(self, task_id: int) -> _Job:
        """The open job of an eval task (its id, version and sampling)."""
        return self._job(task_id)

    def record_episodes(self, task_id: int, episodes: list, grades: list) -> None:
        """Keep the grades of one task's finished episodes (rl/hub/episodes.py `Episode`s, same order); an
        episode's length is its model tokens (the observations excluded)."""
        job = self._job(task_id)
        job.results[task_id] = EvalTaskResult(
            task_id=task_id,
            row_index=job.rows[task_id],
            completions=[
                EvalCompletion(
                    reward=g.value,
                    components={**g.components, "turns": float(len(e.turns)), "tool_calls": float(e.tool_calls)},
                    length=sum(end - start for start, end, *_ in e.turns),
                    finish_reason=e.finish_reason,
                )
                for e, g in zip(episodes, grades, strict=True)
            ],
        )

    def record(self, task_id: int, completions: list[PackedCompletion], rewards: list) -> None:
        """Keep the scores of one task's completions (`rewards`: verifier `Reward`s, same order)."""
        job = self._job(task_id)
        job.results[task_id] = EvalTaskResult(
            task_id=task_id,
            row_index=job.rows[task_id],
            completions=[
                EvalCompletion(reward=r.value, components=r.components, length=len(c), finish_reason=c.finish_reason)
                for c, r in zip(completions, rewards, strict=True)
            ],
        )

    def give_up(self, task_id: int) -> None:
        """Scoring of this task failed for good: the job finishes without it (`EvalJob.failed`)."""
        self._job(task_id).failed.add(task_id)

    def report(self, job_id: str) -> EvalJob:
        """The job's progress; once finished, its results, and the job is forgotten (the caller has them)."""
        job = self._jobs.get(job_id)
        if job is None:
            raise HubError(404, "unknown_eval", f"no eval job {job_id}")
        out = EvalJob(
            job_id=job_id,
            version=job.version,
            total=len(job.rows),
            done=len(job.results) + len(job.failed),
            failed=len(job.failed),
        )
        if job.finished:
            out.results = [job.results[t] for t in sorted(job.results, reverse=True)]
            for tid in job.rows:
                self._job_of.pop(tid, None)
            del self._jobs[job_id]
        return out

    def _job(self, task_id: int) -> _Job:
        return self._jobs[self._job_of[task_id]]
