"""Episodes of a multi-turn environment (rl/envs/) on the hub: the turns workers are leased, and their ledger.

A training task of an environment run starts as any task: its first lease asks `sampling.n`
completions of the prompt. Each becomes the first turn of one of the task's n episodes (its GRPO
group). Every later turn is its own leased item, with an id of its own (`turn_id`), one
completion, and the token ids of its episode so far as the prompt: the prompt, the model's turns
exactly as generated, the observations rendered by the hub. A worker only ever adds one turn: a
turn must end at its first end-of-turn token, so it cannot append an observation of its own.
When every episode is done the group (graded by the environment, trusted code) is buffered like
any scored group. Episodes are JSON, saved in the hub's database after every step (`EpisodeStore`).
An eval task (negative id, rl/hub/evals.py) plays its episodes the same way, with turn ids of its own
(negative too), leased only with the eval job's version and sampling; its grades go to the job.
Bookkeeping only: the runner (rl/hub/runner.py) runs the environment's steps off the event loop.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

from rl.config import EnvSource, RunConfig
from rl.hub.data import PromptSet
from rl.hub.evals import EvalJobs
from rl.sampling import completion_seeds
from rl.wire.packed import PackedCompletion
from rl.wire.protocol import LeasedTask, SamplingParamsWire, ScoredCompletion, ScoredGroup

TURN_ID_BASE = 1 << 40
"""Turn ids are TURN_ID_BASE + task id * MAX_EPISODES + episode, apart from task ids (>= 0); an eval task's
(id < 0) are the same, negated: -(TURN_ID_BASE + -task id * MAX_EPISODES + episode), apart from eval ids."""
MAX_EPISODES = 1 << 10
TURN_SEED_SALT = 0x7E57_7A12
"""Later turns draw their seeds apart from first turns (`HubState.seeds_of`)."""


def turn_id(task_id: int, episode: int) -> int:
    if task_id < 0:  # an eval task
        return -(TURN_ID_BASE - task_id * MAX_EPISODES + episode)
    return TURN_ID_BASE + task_id * MAX_EPISODES + episode


def split_turn_id(tid: int) -> tuple[int, int]:
    """(task id, episode index) of a turn id."""
    if tid < 0:
        task, episode = divmod(-tid - TURN_ID_BASE, MAX_EPISODES)
        return -task, episode
    return divmod(tid - TURN_ID_BASE, MAX_EPISODES)


@dataclass
class Episode:
    """One episode: everything after the prompt, and the environment's state. JSON via `asdict`."""

    state: dict[str, Any]
    tokens: list[int] = field(default_factory=list)
    """The model's turns as generated and the observations as rendered, in order."""
    logprobs: list[float] = field(default_factory=list)
    """Per token of `tokens`: the behaviour log-prob on the model's tokens, 0 on observation tokens."""
    turns: list[list[int]] = field(default_factory=list)
    """[start, end, seed, policy version] of each model turn within `tokens`."""
    rewards: dict[str, float] = field(default_factory=dict)
    done: bool = False
    finish_reason: str = "stop"
    worker_id: str = ""
    """Who generated the last turn: its next turn goes there first (its prefix cache holds the episode)."""
    tool_calls: int = 0
    tool_errors: int = 0
    tool_s: float = 0.0


@dataclass
class StepOutcome:
    """An environment step's result, computed off the event loop (rl/hub/service.py)."""

    state: dict[str, Any]
    done: bool
    rewards: dict[str, float]
    observation_ids: list[int]
    tool_calls: int = 0
    tool_errors: int = 0
    tool_s: float = 0.0


class Episodes:
    """The episodes in flight, by training task id, and the queue of turns waiting for a worker."""

    @classmethod
    def for_run(cls, cfg: RunConfig, prompts: PromptSet, task_rows: dict[int, int],
                evals: EvalJobs | None = None) -> Episodes:  # fmt: skip
        """The run's episodes: enabled when its data source is an environment (`data.source.type: env`).
        `task_rows`: the hub state's outstanding task id -> row index (read here, never written);
        `evals`: the hub's eval jobs (their tasks' rows, versions and sampling)."""
        src = cfg.data.source
        turns = int(src.params.get("max_turns", 4)) if isinstance(src, EnvSource) else 1
        out = cls(cfg.trainer.seed, turns, cfg.model.max_model_len, cfg.sampling.max_tokens)
        out.enabled = isinstance(src, EnvSource)
        out.prompts, out.task_rows, out.evals = prompts, task_rows, evals
        return out

    enabled = False
    """An environment run: every training task is a group of episodes."""

    def __init__(self, run_seed: int, max_turns: int, max_model_len: int, max_tokens: int,
                 end_ids: set[int] | None = None):  # fmt: skip
        self.run_seed, self.max_turns = run_seed, max_turns
        self.max_model_len, self.max_tokens = max_model_len, max_tokens
        self.end_ids = end_ids or set()
        """End-of-turn token ids: a turn ends at the first one."""
        self.prompts: PromptSet | None = None
        self.task_rows: dict[int, int] = {}
        """The hub state's outstanding task id -> row index (`for_run`)."""
        self.evals: EvalJobs | None = None
        self.groups: dict[int, list[Episode]] = {}
        self.queue: deque[int] = deque()
        self.turns_done = 0
        self.observation_tokens = 0
        self.reuse = Counter()
        """Later turns (`turns`), those generated by the previous turn's worker (`same_worker`), their prefix
        tokens (`prefix_tokens`: prompt, turns and observations so far) and of those the tokens the worker
        reported found in its prefix cache (`cached_tokens`, the worker's word, capped at the prefix)."""

    def __contains__(self, tid: int) -> bool:
        """Is `tid` the id of an episode's turn (rather than a task or an eval task)?"""
        return tid >= TURN_ID_BASE or tid <= -TURN_ID_BASE

    def task_of(self, tid: int) -> int:
        return split_turn_id(tid)[0] if tid in self else tid

    @property
    def in_flight(self) -> int:
        return sum(not e.done for g in self.groups.values() for e in g)

    def summary(self) -> dict[str, float]:
        """For /v1/status and `rl status`."""
        r = self.reuse
        return {"in_flight": float(self.in_flight), "turns_queued": float(len(self.queue)),
                "turns_done": float(self.turns_done), "observation_tokens": float(self.observation_tokens),
                "same_worker_share": r["same_worker"] / max(r["turns"], 1),
                "prefix_cached_share": r["cached_tokens"] / max(r["prefix_tokens"], 1)}  # fmt: skip

    # ------------------------------------------------------------------ leasing

    def seed_of(self, tid: int) -> int:
        task, j = split_turn_id(tid)
        episode = self.groups[task][j]
        return completion_seeds(self.run_seed ^ TURN_SEED_SALT, tid, self.max_turns)[len(episode.turns)]

    def example_of(self, tid: int) -> dict[str, Any]:
        """The data row of a task (training or eval) or of one of its episodes' turns."""
        task = self.task_of(tid)
        return self.evals.example(task)[1] if task < 0 else self.prompts.rows[self.task_rows[task]]

    def prompt_ids_of(self, task: int) -> list[int]:
        """The prompt's token ids of a task (training or eval)."""
        return self.evals.prompt_ids(task) if task < 0 else self.prompts.prompt_ids[self.task_rows[task]]

    def next_turns(self, worker_id: str, sampling: SamplingParamsWire,
                   max_tasks: int) -> tuple[list[LeasedTask], SamplingParamsWire] | None:  # fmt: skip
        """Up to `max_tasks` waiting turns of training episodes, the worker's own first."""
        waiting = [t for t in self.queue if t > 0]
        return (self._lease(worker_id, waiting, max_tasks), sampling.model_copy(update={"n": 1})) if waiting else None

    def next_eval_turns(self, worker_id: str, version: int,
                        max_tasks: int) -> tuple[list[LeasedTask], SamplingParamsWire] | None:  # fmt: skip
        """Up to `max_tasks` waiting turns of one eval job of `version`, at the job's sampling."""
        jobs = {t: self.evals.job_of(self.task_of(t)) for t in self.queue if t < 0}
        job = next((j for j in jobs.values() if j.version == version), None)
        if job is None:
            return None
        waiting = [t for t, j in jobs.items() if j is job]
        return self._lease(worker_id, waiting, max_tasks), job.sampling.model_copy(update={"n": 1})

    def _lease(self, worker_id: str, waiting: list[int], max_tasks: int) -> list[LeasedTask]:
        """Take up to `max_tasks` of the `waiting` turns off the queue, the worker's own episodes first."""
        mine = [t for t in waiting if self._episode(t).worker_id == worker_id]
        chosen = (mine + [t for t in waiting if t not in mine])[:max_tasks]
        tasks = []
        for t in chosen:
            self.queue.remove(t)
            task, j = split_turn_id(t)
            ids = self.prompt_ids_of(task) + self.groups[task][j].tokens
            tasks.append(LeasedTask(task_id=t, prompt_token_ids=ids, seeds=[self.seed_of(t)]))
        return tasks

    def requeue(self, tid: int) -> None:
        task, j = split_turn_id(tid)
        group = self.groups.get(task)
        if group is not None and not group[j].done and tid not in self.queue:
            self.queue.appendleft(tid)

    def check_turn(self, tid: int, c: PackedCompletion) -> str | None:
        """Why a submitted turn is refused, or None: a turn ends at its first end-of-turn token (what follows
        would be text the worker, not the model in this context, put there: an observation of its own)."""
        task, j = split_turn_id(tid) if tid in self else (tid, -1)
        if tid in self and (task not in self.groups or self.groups[task][j].done):
            return f"turn {tid}: no such episode in flight"
        ids = c.ids.tolist()
        ends = [i for i, t in enumerate(ids) if t in self.end_ids]
        if ends and ends[0] != len(ids) - 1:
            return (f"task {task}: {len(ids) - 1 - ends[0]} tokens after the end of the turn; "
                    "a turn ends at its first end-of-turn token (observations come from the hub)")  # fmt: skip
        return None

    # ------------------------------------------------------------------ steps

    def inputs(self, tid: int, n_completions: int, reset) -> list[tuple[int, dict[str, Any]]]:
        """(episode index, state before the step) for a submission of `tid`; a first turn resets n episodes."""
        if tid in self:
            task, j = split_turn_id(tid)
            return [(j, self.groups[task][j].state)]
        return [(j, reset()) for j in range(n_completions)]

    def apply(self, tid: int, completions: list[PackedCompletion], version: int, worker_id: str,
              outcomes: list[tuple[int, StepOutcome]], first_seeds: list[int], prompt_len: int,
              cached: int = 0) -> int:  # fmt: skip
        """Record the turns and their steps; queue the next turns. Returns the task id.

        `cached`: prompt tokens the worker reported found in its prefix cache (counted for a later turn).
        An episode also ends when the context has no room left for a full turn after the observation."""
        if tid in self:
            task, j = split_turn_id(tid)
            group = self.groups[task]
            prefix = prompt_len + len(group[j].tokens)
            self.reuse.update(turns=1, same_worker=group[j].worker_id == worker_id, prefix_tokens=prefix,
                              cached_tokens=min(cached, prefix))  # fmt: skip
        else:
            task, group = tid, [Episode(state={}) for _ in completions]
            self.groups[task] = group
        for c, (j, out) in zip(completions, outcomes, strict=True):
            ep = group[j]
            seed = first_seeds[j] if tid not in self else self.seed_of(turn_id(task, j))
            start = len(ep.tokens)
            ep.tokens += c.ids.tolist()
            ep.logprobs += c.logprobs.tolist()
            ep.turns.append([start, len(ep.tokens), seed, version])
            ep.state, ep.worker_id, ep.finish_reason = out.state, worker_id, c.finish_reason
            for k, v in out.rewards.items():
                ep.rewards[k] = ep.rewards.get(k, 0.0) + v
            ep.tool_calls += out.tool_calls
            ep.tool_errors += out.tool_errors
            ep.tool_s += out.tool_s
            self.turns_done += 1
            room = self.max_model_len - prompt_len - len(ep.tokens) - len(out.observation_ids)
            ep.done = out.done or len(ep.turns) >= self.max_turns or room < self.max_tokens
            if not ep.done:
                ep.tokens += out.observation_ids
                ep.logprobs += [0.0] * len(out.observation_ids)
                self.observation_tokens += len(out.observation_ids)
                self.queue.append(turn_id(task, j))
        return task

    def finished(self, task: int) -> bool:
        return all(e.done for e in self.groups[task])

    def group(self, task: int, row_index: int, prompt_ids: list[int], grades: list, worker_id: str,
              worker_name: str, seeds: list[int]) -> ScoredGroup:  # fmt: skip
        """The finished episodes of `task` as one scored group (grades: the environment's, in episode order)."""
        episodes = self.groups.pop(task)
        completions = [
            ScoredCompletion.model_construct(
                token_ids=e.tokens, logprobs=e.logprobs, finish_reason=e.finish_reason, reward=g.value,
                components={**g.components, **e.rewards, "tool_calls": float(e.tool_calls),
                            "tool_errors": float(e.tool_errors), "tool_s": e.tool_s, "turns": float(len(e.turns)),
                            "observation_tokens": float(len(e.tokens) - sum(t[1] - t[0] for t in e.turns))},
                turns=e.turns,
            )
            for e, g in zip(episodes, grades, strict=True)
        ]  # fmt: skip
        return ScoredGroup.model_construct(
            task_id=task, row_index=row_index, prompt_token_ids=prompt_ids,
            policy_version=min(t[3] for e in episodes for t in e.turns),  # staleness counts from the oldest turn
            worker_id=worker_id, worker_name=worker_name, completions=completions, seeds=seeds,
            gen_s=0.0, score_s=0.0,
        )  # fmt: skip

    def forget(self, task: int) -> None:
        """Drop a task's episodes (it starts over from its first turn)."""
        group = self.groups.pop(task, None)
        if group is not None:
            mine = {turn_id(task, j) for j in range(len(group))}
            self.queue = deque(t for t in self.queue if t not in mine)

    def _episode(self, tid: int) -> Episode:
        task, j = split_turn_id(tid)
        return self.groups[task][j]

    # ------------------------------------------------------------------ persistence

    def dump(self, task: int) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.groups[task]]

    def load(self, task: int, episodes: list[dict[str, Any]]) -> None:
        """Restore a task's episodes (a restarted hub): its unfinished episodes' turns are queued again."""
        group = [Episode(**e) for e in episodes]
        self.groups[task] = group
        for j, e in enumerate(group):
            if not e.done:
                self.queue.append(turn_id(task, j))
