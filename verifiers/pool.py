"""`VerifierPool`: score completions with the configured reward terms, never blocking the caller's loop.

    pool = VerifierPool.from_config(cfg.rewards)         # starts processes, returns at once
    rewards = await pool.score_many([(text, row), ...])  # in order, one Reward per item
    pool.close()

Where each term runs (`verifiers.terms`): format/length inline; math and custom functions in
`workers` worker processes (small chunks out, one answer per item back) with a hard `timeout_s` per
item, after which the worker is killed, the item's terms score 0 with the reason and a fresh worker
takes the rest of its chunk; code and reasoning-gym in bubblewrap sandboxes. Start-up (imports,
about 1-2 s) runs in the background; the first call waits for it. One event loop at a time may use
a pool (the hub's, or one per `score_many_sync` call); `close()` is synchronous and safe in a loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import pickle
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from verifiers._ipc import ChildDied, ChildProcess, IdleSet
from verifiers.base import Example, Reward, VerifierError, combine, failed, finite
from verifiers.terms import TABLE, Term, resolve_all

log = logging.getLogger(__name__)

WORKER_STARTUP_TIMEOUT_S = 120.0
MAX_CHUNK = 16


class _Worker:
    def __init__(self, init: str, env: dict[str, str]) -> None:
        self.child = ChildProcess([sys.executable, "-m", "verifiers.worker", init], env=env)
        self.ready = False


class VerifierPool:
    """Scores `(completion_text, example)` items with weighted reward terms; see the module docstring."""

    def __init__(
        self,
        terms: Sequence[Any],
        workers: int = 2,
        timeout_s: float = 5.0,
        *,
        worker_memory_mb: int | None = 4096,
    ) -> None:
        """`terms`: `RewardTerm`s; `workers`: worker processes (and sandbox concurrency); `timeout_s`:
        hard per-item limit; `worker_memory_mb`: address-space cap of workers that run only built-in
        terms (none when a custom function runs there)."""
        if workers < 1 or timeout_s <= 0:
            raise VerifierError(f"need workers >= 1 and timeout_s > 0 (got {workers}, {timeout_s})")
        self.terms: list[Term] = resolve_all(terms, timeout_s)
        self.workers, self.timeout_s = workers, timeout_s
        self._worker_terms = [t for t in self.terms if t.site == "worker"]
        self._sandboxed: dict[str, Any] = {}
        self._closed = False
        try:
            for t in self.terms:
                if t.site == "sandbox":
                    self._sandboxed[t.name] = t.target(t.params, timeout_s=timeout_s, concurrency=workers)
        except BaseException:
            self.close()
            raise
        # The address-space cap contains math blow-ups; custom functions may legitimately load models.
        builtin_only = all(t.name in TABLE for t in self._worker_terms)
        memory_mb = worker_memory_mb if builtin_only else None
        init = {"terms": [[t.name, t.target, t.params] for t in self._worker_terms], "memory_mb": memory_mb}
        self._init = json.dumps(init)
        paths = [p or os.getcwd() for p in sys.path]
        self._env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
        self._idle: IdleSet[_Worker] = IdleSet()
        self._all: list[_Worker] = []
        for _ in range(workers if self._worker_terms else 0):
            self._spawn()
        self._latencies_ms: deque[float] = deque(maxlen=8192)
        self._counts = {"scored": 0, "timeouts": 0, "errors": 0, "worker_restarts": 0}

    @classmethod
    def from_config(cls, rewards: Any) -> VerifierPool:
        """From a `RewardsConfig` (terms, workers, timeout_s)."""
        return cls(rewards.terms, workers=rewards.workers, timeout_s=rewards.timeout_s)

    # ------------------------------------------------------------------ workers

    def _spawn(self) -> None:
        worker = _Worker(self._init, self._env)
        self._all.append(worker)
        self._idle.release(worker)

    def _retire(self, worker: _Worker) -> None:
        worker.child.kill()
        if worker in self._all:
            self._all.remove(worker)
        if not self._closed:
            self._counts["worker_restarts"] += 1
            self._spawn()

    async def _ensure_ready(self, worker: _Worker) -> None:
        if worker.ready:
            return
        await worker.child.wait_ready(WORKER_STARTUP_TIMEOUT_S, "verifier worker")
        worker.ready = True

    async def _acquire_worker(self) -> _Worker:
        worker = await self._idle.acquire()
        while worker.ready and not worker.child.alive():  # died while idle (e.g. killed from outside)
            self._retire(worker)
            worker = await self._idle.acquire()
        try:
            await self._ensure_ready(worker)
        except BaseException:
            self._retire(worker)
            raise
        return worker

    def _decode(self, reply: dict[str, Any]) -> dict[str, Reward]:
        rewards = {}
        for t in self._worker_terms:
            value, components, info, error = reply[t.name]
            self._counts["errors"] += bool(error)
            rewards[t.name] = Reward(finite(value), {str(k): finite(v) for k, v in components.items()}, str(info))
        return rewards

    async def _score_in_worker(self, chunk: list[tuple[str, Example]]) -> list[dict[str, Reward]]:
        """Score a chunk on one worker, which streams one reply per item. Each item gets `timeout_s`
        from the moment the previous reply arrived (when the worker started it); on a timeout or a
        crash that item scores 0, the worker is replaced, and the rest of the chunk continues there."""
        loop = asyncio.get_running_loop()
        out: list[dict[str, Reward]] = []
        while len(out) < len(chunk):
            worker = await self._acquire_worker()
            deadline = loop.time() + self.timeout_s
            try:
                await worker.child.send_frame(pickle.dumps(chunk[len(out) :]), deadline)
                while len(out) < len(chunk):
                    out.append(self._decode(json.loads(await worker.child.read_frame(deadline))))
                    deadline = loop.time() + self.timeout_s
            except asyncio.CancelledError:
                self._retire(worker)  # its replies would arrive out of step
                raise
            except TimeoutError:
                self._counts["timeouts"] += 1
                self._retire(worker)
                reason = f"timeout after {self.timeout_s:g}s (worker killed)"
                out.append({t.name: failed(reason) for t in self._worker_terms})
                continue
            except (ChildDied, ValueError, KeyError, TypeError, AttributeError) as e:
                self._counts["errors"] += 1
                log.warning("verifier worker failed (%s); replacing it", e)
                self._retire(worker)
                out.append({t.name: failed(f"worker crashed: {e}") for t in self._worker_terms})
                continue
            self._idle.release(worker)
        return out

    async def _score_in_workers(self, items: list[tuple[str, Example]], processes: int) -> list[dict[str, Reward]]:
        # Chunks keep each worker busy back to back (no idle round trip per item) while still
        # spreading a small GRPO group over `processes` workers: one lane of chunks per worker.
        size = max(1, min(MAX_CHUNK, math.ceil(len(items) / (2 * processes))))
        chunks = [items[k : k + size] for k in range(0, len(items), size)]
        lanes = [chunks[i::processes] for i in range(min(processes, len(chunks)))]

        async def lane(mine: list) -> list[list[dict[str, Reward]]]:
            return [await self._score_in_worker(chunk) for chunk in mine]

        done = await asyncio.gather(*(lane(mine) for mine in lanes))
        n = len(lanes)  # chunk j is lane j % n's (j // n)-th
        return [r for j in range(len(chunks)) for r in done[j % n][j // n]]

    # ------------------------------------------------------------------ scoring

    async def score_many(self, items: Sequence[tuple[str, Example]], processes: int | None = None) -> list[Reward]:
        """One `Reward` per `(completion_text, example)`, in order; never raises for bad model output.

        `processes`: worker processes this call may use at once (None: all); the hub gives each job one, so
        one operator's slow answers never hold every process (rl/hub/fair.py)."""
        if self._closed:
            raise VerifierError("the verifier pool is closed")
        items = list(items)
        if not items:
            return []
        start = time.perf_counter()
        per_term: dict[str, list[Reward]] = {}
        for t in self.terms:
            if t.site == "inline":
                per_term[t.name] = [self._inline(t, text, example) for text, example in items]
        jobs = [self._sandboxed[t.name].score_many(items) for t in self.terms if t.site == "sandbox"]
        if self._worker_terms:
            jobs.append(self._score_in_workers(items, min(processes or self.workers, self.workers)))
        results = await asyncio.gather(*jobs)
        sandbox_names = [t.name for t in self.terms if t.site == "sandbox"]
        per_term.update(zip(sandbox_names, results[: len(sandbox_names)], strict=True))
        if self._worker_terms:
            by_item = results[-1]
            for t in self._worker_terms:
                per_term[t.name] = [r[t.name] for r in by_item]
        out = [combine([(t.name, t.weight, per_term[t.name][i]) for t in self.terms]) for i in range(len(items))]
        elapsed_ms = (time.perf_counter() - start) * 1000
        self._latencies_ms.extend([elapsed_ms] * len(items))
        self._counts["scored"] += len(items)
        return out

    @staticmethod
    def _inline(term: Term, text: str, example: Example) -> Reward:
        try:
            return term.target(text, example, **term.params)
        except Exception as e:
            return failed(f"error: {type(e).__name__}: {e}")

    def score_many_sync(self, items: Sequence[tuple[str, Example]]) -> list[Reward]:
        """`score_many` for scripts and the CLI (not from inside a running event loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.score_many(items))
        raise RuntimeError("score_many_sync called inside a running event loop; use `await pool.score_many`")

    def metrics(self) -> dict[str, float]:
        """Counters and latency percentiles (of an item's `score_many` call) as `verifier/...` floats."""
        lat = sorted(self._latencies_ms)

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0

        counts = dict(self._counts)
        sandbox_restarts = 0.0
        for term in self._sandboxed.values():
            m = term.metrics()
            counts["timeouts"] += m.get("timeouts", 0)
            counts["errors"] += m.get("errors", 0)
            sandbox_restarts += m.get("restarts", 0)
        out = {f"verifier/{k}": float(v) for k, v in counts.items()}
        out.update(
            {
                "verifier/latency_p50_ms": pct(0.5),
                "verifier/latency_p99_ms": pct(0.99),
                "verifier/sandbox_restarts": sandbox_restarts,
                "verifier/workers_alive": float(sum(w.child.alive() for w in self._all)),
            }
        )
        return out

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Stop every worker and sandbox now (synchronous; fine to call from inside a loop)."""
        self._closed = True
        for worker in getattr(self, "_all", []):
            worker.child.close_stdin()
            worker.child.kill()
        for term in self._sandboxed.values():
            term.close()

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> VerifierPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
