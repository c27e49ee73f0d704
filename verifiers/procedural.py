"""reasoning-gym: procedural tasks as a prompt source and as a (sandboxed) scorer.

Prompt source: `make_dataset(name, params, size, seed)` returns rows (`question`, `answer`,
`metadata` with `source_dataset`), generated offline and deterministically by seed.
Scorer: the `reasoning_gym` term. The answer is pulled from the completion in the pool's process
(param `extract`, default `answer_tag_or_last_number`: the last `<answer>...</answer>`, else the
last number; `answer_tag`, `last_number` and `raw` are the strict variants), then scored by the
dataset's own `score_answer` (param `dataset`, else the row's `metadata.source_dataset`) inside
persistent sandboxed servers (`_rg_server.py`): a batch costs one fork in the sandbox, not one
sandbox start, so hundreds of answers per second fit on one core.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import pickle
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from verifiers._ipc import ChildDied, ChildProcess, IdleSet
from verifiers.base import Example, Reward, VerifierError, failed
from verifiers.extract import AnswerMode, extract_answer
from verifiers.sandbox import SCRIPTS, SandboxSpec, bwrap_argv, python_command, require_sandbox, script_binds

log = logging.getLogger(__name__)

SERVER = Path(__file__).with_name("_rg_server.py")
STARTUP_TIMEOUT_S = 120.0


def make_dataset(name: str, params: dict[str, Any] | None = None, size: int = 1000, seed: int = 0) -> list[dict]:
    """`size` rows of reasoning-gym dataset `name` with its config `params`, deterministic by `seed`."""
    import reasoning_gym

    try:
        dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **(params or {}))
    except Exception as e:  # unknown names and bad params raise various types
        raise VerifierError(f"reasoning-gym dataset {name!r} with params {params or {}}: {e}") from e
    return [dict(entry) for entry in dataset]


def dataset_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


class ReasoningGymParams(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    dataset: str | None = None
    """Dataset whose scorer to use (None: each row's `metadata.source_dataset`)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Dataset config for the scorer (the same params the data source used; most scorers ignore them)."""
    extract: AnswerMode = "answer_tag_or_last_number"
    """How the answer is taken from the completion (see `verifiers.extract.extract_answer`)."""
    isolation: Literal["batch", "item"] = "batch"
    """Fork a fresh scorer process per batch (fast) or per item (about 4 ms each)."""
    servers: int | None = Field(None, ge=1)
    """Sandboxed scorer servers (None: the pool's worker count)."""
    memory_mb: int = Field(2048, ge=256)
    """Address-space limit of each server and its children."""


class _Server:
    def __init__(self, argv: list[str]) -> None:
        self.child = ChildProcess(argv)
        self.ready = False


class ReasoningGymTerm:
    """The `reasoning_gym` reward term over a few persistent sandboxed scorer servers."""

    def __init__(self, params: dict[str, Any], *, timeout_s: float, concurrency: int) -> None:
        require_sandbox()
        self.params = ReasoningGymParams(**params)
        self.timeout_s = timeout_s
        python, roots = python_command(with_site_packages=True)
        limits = json.dumps({"max_processes": 64, "memory_mb": self.params.memory_mb})
        script = f"{SCRIPTS}/{SERVER.name}"
        spec = SandboxSpec(ro_paths=roots, ro_files=script_binds(SERVER))
        self._argv = bwrap_argv(spec, [*python, script, limits])
        self._servers: IdleSet[_Server] = IdleSet()
        self._all: list[_Server] = []
        self._closed = False
        for _ in range(self.params.servers or concurrency):
            self._add_server()
        self.timeouts = 0
        self.errors = 0
        self.restarts = 0

    def _add_server(self) -> None:
        server = _Server(self._argv)
        self._all.append(server)
        self._servers.release(server)

    def _replace(self, server: _Server) -> None:
        server.child.kill()
        if server in self._all:
            self._all.remove(server)
        if not self._closed:
            self.restarts += 1
            self._add_server()

    async def _ensure_ready(self, server: _Server) -> None:
        if server.ready:
            return
        await server.child.wait_ready(STARTUP_TIMEOUT_S, "reasoning-gym sandbox server")
        server.ready = True

    async def score_many(self, items: list[tuple[str, Example]]) -> list[Reward]:
        p = self.params
        rewards: list[Reward | None] = [None] * len(items)
        todo: list[tuple[int, str, Example, str]] = []
        for i, (text, example) in enumerate(items):
            answer = extract_answer(text, p.extract)
            dataset = p.dataset or (example.get("metadata") or {}).get("source_dataset")
            if answer is None:
                rewards[i] = failed(f"no answer found ({p.extract})", extracted=0.0)
            elif not isinstance(dataset, str):
                rewards[i] = failed("no dataset: set the term's `dataset` or the row's metadata.source_dataset")
            else:
                todo.append((i, answer, example, dataset))
        n_chunks = max(1, min(len(self._all), math.ceil(len(todo) / 8)))
        size = math.ceil(len(todo) / n_chunks) if todo else 0
        chunks = [todo[k : k + size] for k in range(0, len(todo), size)] if todo else []
        for chunk, scored in zip(chunks, await asyncio.gather(*(self._score_chunk(c) for c in chunks)), strict=True):
            for (i, answer, _, _), reward in zip(chunk, scored, strict=True):
                note = reward.info or (f"answer {answer[:80]!r} scored {reward.value:g}" if reward.value < 1 else "")
                rewards[i] = Reward(reward.value, reward.components, note)
        return [r if r is not None else failed("not scored") for r in rewards]

    async def _score_chunk(self, chunk: list[tuple[int, str, Example, str]]) -> list[Reward]:
        """Score on one server. If an answer kills the server, results not yet relayed are lost too,
        so the first unscored item is retried alone on a fresh server: it scores 0 only if it kills
        that one as well, and the other items are scored normally."""
        rewards: list[Reward | None] = [None] * len(chunk)
        suspect: int | None = None
        while todo := [k for k, r in enumerate(rewards) if r is None]:
            batch = [suspect] if suspect is not None else todo
            server = await self._servers.acquire()
            try:
                await self._ensure_ready(server)
            except BaseException:
                self._replace(server)
                raise
            got, failure = await self._request(server, [chunk[k] for k in batch])
            for j, reward in got.items():
                rewards[batch[j]] = reward
            suspect = None
            if failure is not None and len(got) < len(batch):
                first = batch[min(j for j in range(len(batch)) if j not in got)]
                if len(batch) == 1:
                    rewards[first] = failed(failure)
                else:
                    suspect = first
        return [r for r in rewards if r is not None]

    async def _request(
        self, server: _Server, sub: list[tuple[int, str, Example, str]]
    ) -> tuple[dict[int, Reward], str | None]:
        """Send one batch; collect the streamed results; (results so far, failure reason or None)."""
        request = {
            "items": [(answer, example, dataset) for _, answer, example, dataset in sub],
            "config": self.params.config,
            "timeout_s": self.timeout_s,
            "isolation": self.params.isolation,
        }
        loop = asyncio.get_running_loop()
        got: dict[int, Reward] = {}
        try:
            await server.child.send_frame(pickle.dumps(request), loop.time() + self.timeout_s + 5.0)
            while True:
                msg = json.loads(await server.child.read_frame(loop.time() + self.timeout_s + 5.0))
                if msg.get("done"):
                    break
                j, score = int(msg["i"]), min(1.0, max(0.0, float(msg["score"])))
                if not 0 <= j < len(sub) or j in got or not math.isfinite(score):
                    raise ValueError(f"unexpected result {msg!r}")
                got[j] = Reward(score, {"extracted": 1.0}, str(msg["info"])[:300])
            if len(got) != len(sub):
                raise ValueError("server finished without scoring every item")
        except asyncio.CancelledError:
            self._replace(server)  # a reply may still arrive: this server's stream is out of step
            raise
        except (TimeoutError, ChildDied, ValueError, KeyError, TypeError) as e:
            self.errors += 1
            log.warning("reasoning-gym sandbox server failed (%s); restarting it", e)
            self._replace(server)
            return got, f"sandbox server failed while scoring this answer: {e}"
        self._servers.release(server)
        self.timeouts += sum("timeout" in r.info for r in got.values())
        return got, None

    def metrics(self) -> dict[str, float]:
        return {"timeouts": float(self.timeouts), "errors": float(self.errors), "restarts": float(self.restarts)}

    def close(self) -> None:
        self._closed = True
        for server in self._all:
            server.child.close_stdin()
            server.child.kill()
