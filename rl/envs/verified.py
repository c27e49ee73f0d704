"""A prompt dataset as an environment: the one-turn case, graded by the row's verifiers.

A plain dataset (`data.source`: reasoning-gym, JSONL, HF datasets, HumanEval) runs through the
same interface as a multi-turn environment (rl/envs/base.py) and the same runner on the hub
(rl/hub/runner.py): a task's `sampling.n` completions are its n one-turn episodes, `step` ends each
at once with the turn's text as the state, and the grade is the verifiers' reward of that text
against the row (`rewards:` in the config). Verifiers score untrusted text, model-written code
included, so the hub grades in its sandboxed verifier pool (verifiers/pool.py), a task's episodes in
one call, served in turns over operators (rl/hub/fair.py): the grade is `grade_many`, a coroutine the
hub gives (`score`); `grade` of one state alone is never called.

The text a verifier scores keeps special tokens (`special_tokens`): stripping them would let a worker
hide trained-on tokens from the scorer; only a final end-of-sequence token is cut.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from rl.envs.base import Grade, State, Step
from verifiers.base import Reward

Score = Callable[[list[tuple[str, dict[str, Any]]], str], Awaitable[list[Reward]]]
"""(texts with their rows, the worker that generated them) -> one verifier `Reward` per text, in order."""


@dataclass(frozen=True)
class Verified:
    score: Score
    max_turns: int = 1
    special_tokens: ClassVar[bool] = True
    """The runner decodes turns with special tokens kept (and a final end-of-sequence token cut)."""
    inline_steps: ClassVar[bool] = True
    """`step` does no work: the runner calls it on the event loop instead of in a thread."""

    def rows(self, size: int, seed: int) -> list[dict[str, Any]]:
        raise TypeError("a dataset's rows come from data.source (rl/hub/data.py), not from the environment")

    def reset(self, row: dict[str, Any]) -> State:
        return {}

    def step(self, state: State, turn: str) -> tuple[State, Step]:
        return {"text": turn}, Step(done=True)

    def grade(self, state: State) -> Grade:
        raise TypeError("a dataset's completions are graded in the verifier pool (grade_many), never alone")

    async def grade_many(self, states: list[State], row: dict[str, Any], worker_id: str) -> list[Reward]:
        """The verifiers' rewards of a task's finished episodes, in order (`Reward` has a grade's fields)."""
        return await self.score([(s["text"], row) for s in states], worker_id)
