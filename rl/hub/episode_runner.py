"""The hub's side of an environment run: each accepted turn is stepped by the environment, off the event loop.

For every accepted turn (a task's first turns, or one later turn) the runner decodes the model's
tokens, runs the environment's `step` (and its tools) in a thread, renders the observation with the
chat template (rl/envs/render.py), then, back on the event loop, records the step in the episodes
(rl/hub/episodes.py), saves them in the database, and buffers the task's group once every episode
is done and graded (an eval task's grades go to its eval job instead; its episodes are not saved: eval
jobs do not outlive the hub). Nothing here reads what a worker says beyond its token ids and log-probs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from rl.envs import Environment, make
from rl.envs.render import ObservationRenderer
from rl.hub.episode_store import EpisodeStore
from rl.hub.episodes import StepOutcome
from rl.hub.records import ScoringJob
from rl.hub.state import HubState
from rl.wire.protocol import ScoredGroup

log = logging.getLogger(__name__)


class EpisodeRunner:
    def __init__(self, state: HubState, tokenizer, store: EpisodeStore | None, decode,
                 on_group: Callable[[ScoredGroup], None] = lambda group: None):  # fmt: skip
        src = state.cfg.data.source
        self.env: Environment = make(src.name, src.params)
        self.state, self.store, self.decode = state, store, decode
        self.on_group = on_group
        """Called with each group buffered, after the state's `scored` (the service credits and observes it)."""
        self.renderer = ObservationRenderer(tokenizer)
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

    def _steps(self, inputs, texts) -> tuple[list[tuple[int, StepOutcome]], float, float]:
        """In a thread: the environment's steps and the observations' token ids; (outcomes, seconds in the
        environment, CPU seconds rendering)."""
        out, env_s, render_s = [], 0.0, 0.0
        for (j, state), (text, ids) in zip(inputs, texts, strict=True):
            t0 = time.perf_counter()
            new_state, step = self.env.step(state, text)
            env_s += time.perf_counter() - t0
            c0 = time.thread_time()
            obs = self.renderer.render(ids, step.messages) if step.messages and not step.done else []
            render_s += time.thread_time() - c0
            out.append(
                (
                    j,
                    StepOutcome(
                        new_state, step.done, step.rewards, obs, step.tool_calls, step.tool_errors, step.tool_s
                    ),
                )
            )
        return out, env_s, render_s

    async def advance(self, job: ScoringJob) -> None:
        """Step the episodes of one accepted submission (`job`); buffer the group when all are done."""
        c0 = time.thread_time()
        tid, st = job.task_id, self.state
        task = self.episodes.task_of(tid)
        ids = [c.ids.tolist() for c in job.completions]
        texts = list(zip(self.decode(ids), ids, strict=True))
        inputs = self.episodes.inputs(tid, len(ids), lambda: self.env.reset(job.example))
        hub_s = time.thread_time() - c0
        try:
            outcomes, env_s, render_s = await asyncio.to_thread(self._steps, inputs, texts)
        except Exception as e:  # noqa: BLE001 - a broken environment drops its task, loudly
            log.exception("environment step of task %d failed; the task is dropped", task)
            self.drop(tid, task, f"{type(e).__name__}: {e}")
            return
        c1 = time.thread_time()
        evaluated = task < 0
        if tid not in st.scoring or task not in (st.evals if evaluated else st.task_rows):
            return  # given up meanwhile (its worker was quarantined: the turn went back to the queue)
        del st.scoring[tid]
        prompt = self.episodes.prompt_ids_of(task)
        first_seeds = st.seeds_of(task, len(ids))  # a first turn's n completions (later turns have their own)
        self.episodes.apply(tid, job.completions, job.policy_version, job.worker_id, outcomes, first_seeds,
                            len(prompt), job.cached_prompt_tokens)  # fmt: skip
        grade_s = grade_cpu = 0.0
        store = None if evaluated else self.store
        if self.episodes.finished(task):
            t2, c2 = time.perf_counter(), time.thread_time()
            grades = [self.env.grade(e.state) for e in self.episodes.groups[task]]
            grade_s, grade_cpu = time.perf_counter() - t2, time.thread_time() - c2
            if evaluated:
                st.evals.record_episodes(task, self.episodes.groups.pop(task), grades)
            else:
                row = st.task_rows[task]
                group = self.episodes.group(task, row, prompt, grades, job.worker_id, job.worker_name,
                                            st.seeds_of(task, st.cfg.sampling.n))  # fmt: skip
                st.scored(group)
                self.on_group(group)
            if store is not None:
                store.delete(task)
        else:
            if store is not None:
                store.save(task, self.episodes.dump(task))
            st.on_work()  # the next turns are leasable
        self.hub_s += hub_s + render_s + time.thread_time() - c1 - grade_cpu
        self.env_s += env_s + grade_s
        self.turns += len(ids)

    def drop(self, tid: int, task: int, error: str) -> None:
        """A task whose environment failed leaves the ledger (counted in `scoring_dropped`, never trained)."""
        st = self.state
        st.scoring.pop(tid, None)
        st.scoring_failures += 1
        st.last_scoring_error = f"task {task}: environment failed: {error}"
        self.episodes.forget(task)
        if task < 0:  # an eval task: its job finishes without it
            if task in st.evals:
                st.evals.give_up(task)
            return
        if task in st.task_rows:
            del st.task_rows[task]
            st.scoring_dropped += 1
            st.on_work()
        if self.store is not None:
            self.store.delete(task)
