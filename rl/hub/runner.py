"""The hub's side of every task: each accepted turn stepped by the environment, each finished group graded.

Every task runs through an environment (rl/envs/): a multi-turn environment's through its own, a plain
dataset's through `Verified` (rl/envs/verified.py), the one-turn case whose grade is the verifiers'.
For every accepted submission (a task's first turns, or one later turn) the runner decodes the
model's tokens, runs the environment's `step` (and its tools) in a thread, renders the observation
with the chat template (rl/envs/render.py), then, back on the event loop, records the step in the
episodes (rl/hub/episodes.py) and saves them in the database. Once all of a task's episodes are
done the task is graded: the environment's `grade` in a thread, or its `grade_many` (the sandboxed
verifier pool, in operator turns). A failing grade is retried after the state's backoff, then the
task is dropped (`HubState.fail_scoring`); a graded group is buffered (an eval task's grades go to its
eval job instead; its episodes are not saved: eval jobs do not outlive the hub).
A one-turn environment's tasks keep no episodes: their group is the submitted completions, forwarded
packed as they came (`HubState.finish_scoring`). Nothing here reads what a worker says beyond its token
ids and log-probs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from rl.envs import Environment, Grade, make
from rl.envs.render import ObservationRenderer
from rl.hub.episode_store import EpisodeStore
from rl.hub.episodes import Episode, StepOutcome
from rl.hub.records import ScoringJob
from rl.hub.state import HubState
from rl.wire.packed import PackedCompletion
from rl.wire.protocol import ScoredGroup

log = logging.getLogger(__name__)


class TaskRunner:
    def __init__(self, state: HubState, tokenizer, store: EpisodeStore | None, decode, env: Environment | None = None,
                 on_group: Callable[[ScoredGroup], None] = lambda group: None):  # fmt: skip
        """`env`: the run's environment (None: the one `data.source` names); `decode`: ids -> texts
        (rl/hub/texts.py); `on_group`: called with each group buffered, after the state's `scored`."""
        src = state.cfg.data.source
        self.env: Environment = env if env is not None else make(src.name, src.params)
        self.state, self.store, self.decode = state, store, decode
        self.on_group = on_group
        self.one_turn = self.env.max_turns == 1
        self.inline = getattr(self.env, "inline_steps", False)
        self.special_tokens = getattr(self.env, "special_tokens", False)
        self.stop_ids = {getattr(tokenizer, "eos_token_id", None)} - {None}
        self.renderer = None if self.one_turn else ObservationRenderer(tokenizer)
        self.episodes = state.episodes
        self.episodes.max_turns = self.env.max_turns
        self.hub_s = 0.0
        """CPU seconds of the hub's own work on turns (decode, render, bookkeeping, saving), the environment's
        steps, grades and tools excluded: thread CPU time, so a busy machine's waits for a core do not count."""
        self.env_s = 0.0
        """Seconds in the environment's steps and grades (its tools included)."""
        self.turns = 0

    def timings(self) -> dict[str, float]:
        """Milliseconds per turn: the hub's own work (CPU), and the environment's (wall time, its tools included)."""
        turns = max(self.turns, 1)
        return {"hub_ms_per_turn": 1e3 * self.hub_s / turns, "env_ms_per_turn": 1e3 * self.env_s / turns}

    def restore(self) -> int:
        """A restarted hub: episodes of still-pending tasks continue from their last completed turn."""
        if self.store is None:
            return 0
        saved = self.store.load()
        resumed = 0
        for task, episodes in saved.items():
            versions = [t[3] for e in episodes for t in e["turns"]]
            if task not in self.state.task_rows or max(versions, default=-1) > self.state.policy_version:
                self.store.delete(task)  # consumed meanwhile, or from after the checkpoint a resume went back to
                continue
            self.state.queue.remove(task)
            self.episodes.load(task, episodes)
            resumed += 1
        if resumed:
            log.info("resumed the episodes of %d tasks from %s", resumed, self.store.path)
        return resumed

    def texts(self, completions: list[PackedCompletion]) -> list[str]:
        """The turns' texts the environment sees: special tokens skipped, or (`special_tokens`: a verifier
        scores them) kept, with only a final end-of-sequence token, where generation stopped, cut."""
        if not self.special_tokens:
            return self.decode([c.ids for c in completions])
        cut = [c.ids[:-1] if len(c.ids) and int(c.ids[-1]) in self.stop_ids else c.ids for c in completions]
        return self.decode(cut, skip_special_tokens=False)

    def _steps(self, inputs, texts, completions) -> tuple[list[tuple], float, float]:
        """The environment's steps: ((episode, state, `Step`) per completion for a one-turn environment, else
        (episode, `StepOutcome`, with the observation's token ids)), seconds in the environment, CPU seconds
        rendering. In a thread, unless the environment's steps do no work (`inline_steps`)."""
        t0 = time.perf_counter()
        steps = [(j, *self.env.step(state, text)) for (j, state), text in zip(inputs, texts, strict=True)]
        env_s = time.perf_counter() - t0
        if self.renderer is None:
            return steps, env_s, 0.0
        c0, out = time.thread_time(), []
        for (j, state, step), c in zip(steps, completions, strict=True):
            obs = self.renderer.render(c.ids.tolist(), step.messages) if step.messages and not step.done else []
            outcome = StepOutcome(state, step.done, step.rewards, obs, step.tool_calls, step.tool_errors, step.tool_s)
            out.append((j, outcome))
        return out, env_s, time.thread_time() - c0

    async def advance(self, job: ScoringJob) -> None:
        """Step the episodes of one accepted submission (`job`); grade and buffer the group when all are done."""
        start, c0 = time.perf_counter(), time.thread_time()
        tid, st = job.task_id, self.state
        task = self.episodes.task_of(tid)
        texts = self.texts(job.completions)
        inputs = self.episodes.inputs(tid, len(texts), lambda: self.env.reset(job.example))
        hub_s = time.thread_time() - c0
        try:
            if self.inline:
                stepped, env_s, render_s = self._steps(inputs, texts, job.completions)
            else:
                stepped, env_s, render_s = await asyncio.to_thread(self._steps, inputs, texts, job.completions)
        except Exception as e:  # noqa: BLE001 - a broken environment drops its task, loudly
            log.exception("environment step of task %d failed; the task is dropped", task)
            self.drop(tid, task, f"{type(e).__name__}: {e}")
            return
        c1 = time.thread_time()
        evaluated = task < 0
        if st.scoring.get(tid) != job.key() or task not in (st.evals if evaluated else st.task_rows):
            return  # given up meanwhile (its worker was quarantined: the turn went back to the queue)
        self.turns += len(texts)
        self.env_s += env_s
        episodes = None if self.one_turn else self._record(job, task, stepped)
        self.hub_s += hub_s + render_s + time.thread_time() - c1
        if not self.one_turn and episodes is None:
            return  # the next turns are leasable
        states = [state for _, state, _ in stepped] if self.one_turn else [e.state for e in episodes]
        graded = await self._grade(job if task == tid else replace(job, task_id=task), states)
        if graded is None:
            return
        if self.one_turn:
            extra = [step.rewards for _, _, step in stepped]
            if any(extra):
                graded = [Grade(g.value, {**g.components, **r}) for g, r in zip(graded, extra, strict=True)]
            group = st.finish_scoring(job, graded, time.perf_counter() - start)
        else:
            group = self._finish(job, task, episodes, graded, time.perf_counter() - start)
        if group is not None:
            self.on_group(group)

    def _record(self, job: ScoringJob, task: int, outcomes) -> list[Episode] | None:
        """Record a multi-turn environment's steps; the episodes to grade once every episode of `task` is done
        (the task, no longer the turn, is then being graded), else None (its episodes are saved)."""
        st, tid = self.state, job.task_id
        del st.scoring[tid]
        prompt = self.episodes.prompt_ids_of(task)
        first_seeds = st.seeds_of(task, len(outcomes))  # a first turn's n completions (later turns have their own)
        self.episodes.apply(tid, job.completions, job.policy_version, job.worker_id, outcomes, first_seeds,
                            len(prompt), job.cached_prompt_tokens)  # fmt: skip
        if not self.episodes.finished(task):
            if self.store is not None and task >= 0:
                self.store.save(task, self.episodes.dump(task))
            st.on_work()
            return None
        st.scoring[task] = job.key()
        return self.episodes.groups[task]

    def _finish(self, job: ScoringJob, task: int, episodes: list[Episode], grades: list,
                score_s: float) -> ScoredGroup | None:  # fmt: skip
        """A multi-turn task's graded `episodes`: its group buffered, or its eval job told."""
        st = self.state
        if st.scoring.get(task) != job.key():
            # Given up meanwhile (quarantined): the task starts over, maybe already with episodes of its own.
            if self.episodes.groups.get(task) is episodes:
                self._forget(task)
            return None
        del st.scoring[task]
        if self.store is not None and task >= 0:
            self.store.delete(task)
        if task < 0:
            st.evals.record_episodes(task, self.episodes.groups.pop(task), grades)
            return None
        row = st.task_rows[task]
        group = self.episodes.group(task, row, self.episodes.prompt_ids_of(task), grades, job.worker_id,
                                    job.worker_name, st.seeds_of(task, st.cfg.sampling.n))  # fmt: skip
        group.score_s = score_s
        st.scored(group)
        return group

    async def _grade(self, job: ScoringJob, states: list) -> list | None:
        """The grades of a finished task's episodes; a failure is retried after the state's backoff, until the
        task is given up (None; also when it was given up meanwhile)."""
        while True:
            t0 = time.perf_counter()
            try:
                if (grade_many := getattr(self.env, "grade_many", None)) is not None:
                    grades = await grade_many(states, job.example, job.worker_id)
                else:
                    grades = await asyncio.to_thread(lambda: [self.env.grade(s) for s in states])
            except Exception as e:  # noqa: BLE001 - any grading failure is retried, then reported
                self.env_s += time.perf_counter() - t0
                live = self.state.scoring.get(job.task_id) == job.key()
                retry_in = self.state.fail_scoring(job, f"{type(e).__name__}: {e}")
                if retry_in is None:
                    log.error("grading task %d failed %d times; dropped: %s", job.task_id, job.attempt, e)
                    if live:
                        self._forget(job.task_id)
                    return None
                log.warning("grading task %d failed (attempt %d): %s; retry in %.1f s", job.task_id, job.attempt, e,
                            retry_in)  # fmt: skip
                await asyncio.sleep(retry_in)
                job = job.retry()
                continue
            self.env_s += time.perf_counter() - t0
            return grades

    def _forget(self, task: int) -> None:
        """A dropped task's episodes, in memory and on disk."""
        self.episodes.forget(task)
        if self.store is not None and task >= 0:
            self.store.delete(task)

    def drop(self, tid: int, task: int, error: str) -> None:
        """A task whose environment failed leaves the ledger (counted in `scoring_dropped`, never trained)."""
        st = self.state
        st.scoring.pop(tid, None)
        st.scoring_failures += 1
        st.last_scoring_error = f"task {task}: environment failed: {error}"
        self._forget(task)
        if task < 0:  # an eval task: its job finishes without it
            if task in st.evals:
                st.evals.give_up(task)
            return
        if task in st.task_rows:
            del st.task_rows[task]
            st.scoring_dropped += 1
            st.on_work()
