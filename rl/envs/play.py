"""Playing episodes outside a run, on the trusted side: held-out evaluation of an environment's policy.

The same rules as the hub's (rl/hub/episodes.py): the prompt's token ids, then each model turn exactly
as generated (cut at its first end-of-turn token) and the environment's observation rendered with the
chat template (rl/envs/render.py); an episode ends when the environment says done, at `max_turns`,
or when the context has no room left for a full turn after the observation. `generate` is any engine
(scripts/learn_env.py uses vLLM): token ids in, each prompt's generated ids out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rl.envs.base import Environment, Grade
from rl.envs.render import ObservationRenderer

Generate = Callable[[list[list[int]]], list[list[int]]]


@dataclass
class Played:
    """One finished episode: its grade and what it took."""

    grade: Grade
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tokens: list[int] = field(default_factory=list)
    """The model's turns and the observations, after the prompt."""
    texts: list[str] = field(default_factory=list)
    """The model's turns, decoded."""


def cut_turn(ids: list[int], end_ids: set[int]) -> list[int]:
    """A turn ends at its first end-of-turn token (kept), as the hub requires of every submitted turn."""
    for i, t in enumerate(ids):
        if t in end_ids:
            return list(ids[: i + 1])
    return list(ids)


def play(env: Environment, rows: list[dict[str, Any]], prompt_ids: list[list[int]], generate: Generate,
         decode: Callable[[list[list[int]]], list[str]], renderer: ObservationRenderer, max_model_len: int,
         max_tokens: int) -> list[Played]:  # fmt: skip
    """Play one episode per row to the end, every turn of every unfinished episode in one `generate` call."""
    if len(rows) != len(prompt_ids):
        raise ValueError(f"{len(rows)} rows but {len(prompt_ids)} prompts")
    states = [env.reset(row) for row in rows]
    played = [Played(Grade(0.0)) for _ in rows]
    active = list(range(len(rows)))
    while active:
        outs = generate([prompt_ids[i] + played[i].tokens for i in active])
        turns = [cut_turn(ids, renderer.end_ids) for ids in outs]
        texts = decode(turns)
        still = []
        for i, ids, text in zip(active, turns, texts, strict=True):
            p = played[i]
            states[i], step = env.step(states[i], text)
            p.tokens += ids
            p.texts.append(text)
            p.turns += 1
            p.tool_calls += step.tool_calls
            p.tool_errors += step.tool_errors
            obs = renderer.render(ids, step.messages) if step.messages and not step.done else []
            room = max_model_len - len(prompt_ids[i]) - len(p.tokens) - len(obs)
            if not (step.done or p.turns >= env.max_turns or room < max_tokens):
                p.tokens += obs
                still.append(i)
        active = still
    for p, state in zip(played, states, strict=True):
        p.grade = env.grade(state)
    return played


def summarise(played: list[Played]) -> dict[str, float]:
    """Mean success (the grade's `correct`, else the grade), grade, turns and tool calls over episodes."""
    n = max(len(played), 1)
    return {
        "success": sum(p.grade.components.get("correct", p.grade.value) for p in played) / n,
        "grade": sum(p.grade.value for p in played) / n,
        "turns": sum(p.turns for p in played) / n,
        "tool_calls": sum(p.tool_calls for p in played) / n,
        "tool_errors": sum(p.tool_errors for p in played) / n,
        "episodes": float(len(played)),
    }
