"""The environment interface: what a multi-turn task is, as the hub (the trusted side) runs it.

An environment is stateless code over a JSON state: `reset(row)` starts an episode from a data
row, `step(state, turn)` takes the model's turn (its decoded text) and returns the observation
messages to show next, this step's reward terms and whether the episode is over, and
`grade(state)` is the final reward. The state is a plain JSON-serialisable dict, kept by the hub
(and in its SQLite ledger between turns), so an episode survives a hub restart and may continue
on any worker. A single-turn task is the one-step case (`step` returns done at once); a plain
dataset is the one-turn environment `Verified` (rl/envs/verified.py), graded by its verifiers.
An environment may define `async grade_many(states, row, worker_id)` instead of `grade`, to grade a
task's episodes together without blocking the hub's event loop (`Verified`: in the verifier pool).
Workers never run any of this: they only generate the model's turns from token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

State = dict[str, Any]
"""An episode's state: JSON-serialisable (it is stored in the hub's ledger between turns)."""


@dataclass
class Step:
    """What one model turn led to."""

    messages: list[dict[str, str]] = field(default_factory=list)
    """Observation messages shown to the model next (role `user` or `tool`); empty when `done`."""
    done: bool = False
    rewards: dict[str, float] = field(default_factory=dict)
    """This step's reward terms (summed per name over the episode, reported beside the grade)."""
    tool_calls: int = 0
    tool_errors: int = 0
    tool_s: float = 0.0
    """Seconds this step's tools ran."""


@dataclass
class Grade:
    """The episode's final reward, computed by trusted code from the state alone."""

    value: float
    components: dict[str, float] = field(default_factory=dict)


class Environment(Protocol):
    """A multi-turn task. Implementations hold only configuration; every call is a pure function of its
    arguments (and the trusted tools it runs), so the hub may call them from any thread."""

    max_turns: int
    """Turns after which the hub ends an episode even if `step` never says done."""

    def rows(self, size: int, seed: int) -> list[dict[str, Any]]:
        """`size` data rows (each with a `question`: the first user message), reproducible from `seed`."""
        ...

    def reset(self, row: dict[str, Any]) -> State: ...

    def step(self, state: State, turn: str) -> tuple[State, Step]: ...

    def grade(self, state: State) -> Grade: ...
